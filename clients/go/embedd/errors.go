package embedd

import (
	"errors"
	"fmt"
)

// Code is a wire error code of protocol v1.
type Code string

// The error codes of the contract. The daemon sends them; the client also
// uses CodeUnavailable for a daemon it cannot reach or that went away
// mid-call, CodeBadFrame for a malformed frame from the daemon and
// CodeTooLarge for a request over the frame limit, so that callers have one
// type to inspect.
const (
	CodeBadFrame    Code = "bad_frame"
	CodeBadRequest  Code = "bad_request"
	CodeUnknownOp   Code = "unknown_op"
	CodeNotFound    Code = "not_found"
	CodeForbidden   Code = "forbidden"
	CodeUnsupported Code = "unsupported"
	CodeDecodeError Code = "decode_error"
	CodeTooLarge    Code = "too_large"
	CodeBusy        Code = "busy"
	CodeOverloaded  Code = "overloaded"
	CodeUnavailable Code = "unavailable"
	CodeCancelled   Code = "cancelled"
	CodeInternal    Code = "internal"
)

// Error is a contract error: a code plus one sentence naming the culprit.
//
// Use errors.As to get at it:
//
//	var e *embedd.Error
//	if errors.As(err, &e) && e.Code == embedd.CodeNotFound { ... }
type Error struct {
	Code    Code
	Message string
	// err is the local cause (a dial or I/O error) when the client made this
	// error itself rather than receiving it from the daemon.
	err error
}

func (e *Error) Error() string {
	return fmt.Sprintf("embedd: %s: %s", e.Code, e.Message)
}

// Unwrap exposes the local cause, so errors.Is(err, syscall.ECONNREFUSED)
// and the like keep working.
func (e *Error) Unwrap() error { return e.err }

// Retryable reports whether the same request may succeed later unchanged:
// the daemon was overloaded, or it (or one of its dependencies) was down.
func (e *Error) Retryable() bool {
	return e.Code == CodeUnavailable || e.Code == CodeOverloaded
}

// IsCode reports whether err is (or wraps) an *Error with the given code.
func IsCode(err error, code Code) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == code
}

// IsRetryable reports whether err is (or wraps) an *Error that is worth
// retrying after a pause: unavailable or overloaded.
func IsRetryable(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Retryable()
}

// ErrClosed is returned by every call on a Client after Close.
var ErrClosed = errors.New("embedd: client is closed")

func localError(code Code, cause error, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...), err: cause}
}
