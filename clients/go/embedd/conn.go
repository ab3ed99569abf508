package embedd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// conn is one socket to the daemon shared by any number of in-flight
// requests: writers take turns under wmu, and a single reader goroutine hands
// each response to the request with the same id. Once broken it stays
// broken; the Client dials a new one.
type conn struct {
	nc       net.Conn
	path     string
	maxFrame int

	wmu sync.Mutex // one frame at a time on the wire

	mu      sync.Mutex
	pending map[uint64]*pendingCall
	err     error         // why the connection broke; set once
	done    chan struct{} // closed when err is set
}

// pendingCall is one request waiting for its response frame(s). The reader
// never blocks on a caller that has gone: it gives up when gone is closed.
type pendingCall struct {
	ch   chan *response
	gone chan struct{}
}

func newConn(nc net.Conn, path string, maxFrame int) *conn {
	c := &conn{
		nc:       nc,
		path:     path,
		maxFrame: maxFrame,
		pending:  make(map[uint64]*pendingCall),
		done:     make(chan struct{}),
	}
	go c.readLoop()
	return c
}

// broken returns why the connection is unusable, or nil while it is healthy.
func (c *conn) broken() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// fail breaks the connection for good: every waiting request sees err.
func (c *conn) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	c.pending = nil
	close(c.done)
	c.mu.Unlock()
	_ = c.nc.Close()
}

func (c *conn) close() { c.fail(ErrClosed) }

// register reserves id before its request is written, so that an early
// response cannot slip past. buf sizes the channel: 1 for a unary call.
func (c *conn) register(id uint64, buf int) (*pendingCall, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return nil, c.err
	}
	p := &pendingCall{ch: make(chan *response, buf), gone: make(chan struct{})}
	c.pending[id] = p
	return p, nil
}

// unregister is the caller's half of the hand-off and must run exactly once
// per register, whatever happened: it is what keeps an abandoned (cancelled,
// timed out) request from leaking its entry.
func (c *conn) unregister(id uint64, p *pendingCall) {
	c.mu.Lock()
	if c.pending[id] == p {
		delete(c.pending, id)
	}
	c.mu.Unlock()
	close(p.gone)
}

func (c *conn) pendingCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.pending)
}

// write sends one whole frame. A frame only partly written leaves the stream
// unusable, so any write error breaks the connection.
func (c *conn) write(ctx context.Context, frame []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.broken(); err != nil {
		return err
	}
	dl, _ := ctx.Deadline()
	_ = c.nc.SetWriteDeadline(dl)
	if _, err := c.nc.Write(frame); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = context.DeadlineExceeded
		}
		e := localError(CodeUnavailable, err, "writing to embedd at %s failed: %v", c.path, err)
		c.fail(e)
		return e
	}
	return nil
}

// wait returns the next response for p, or why none will come.
func (c *conn) wait(ctx context.Context, p *pendingCall) (*response, error) {
	select {
	case r := <-p.ch:
		return r, nil
	case <-c.done:
		// A response may have been handed over just before the break.
		select {
		case r := <-p.ch:
			return r, nil
		default:
		}
		return nil, c.broken()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (c *conn) readLoop() {
	br := bufio.NewReaderSize(c.nc, 64<<10)
	for {
		body, err := readFrame(br, c.maxFrame)
		if err != nil {
			c.fail(c.readError(err))
			return
		}
		r, err := decodeResponse(body)
		if err != nil {
			c.fail(c.readError(err))
			return
		}
		id, ok := responseID(r.ID)
		if !ok {
			// The daemon answers with id nil only when it cannot tell which
			// request it is answering (bad_frame, too many connections); it
			// closes the connection next, so everyone in flight gets that error.
			if !r.OK {
				c.fail(r.err())
				return
			}
			continue // a success for a request we never sent without an id
		}
		c.mu.Lock()
		p := c.pending[id]
		if p != nil && !r.More {
			delete(c.pending, id)
		}
		c.mu.Unlock()
		if p == nil {
			continue // its caller gave up (cancelled or timed out)
		}
		select {
		case p.ch <- r:
		case <-p.gone:
		}
	}
}

// readError turns what ended the read loop into the error in-flight calls see.
func (c *conn) readError(err error) error {
	var fe *errFrame
	switch {
	case errors.As(err, &fe):
		return localError(CodeBadFrame, err, "embedd at %s sent a malformed frame: %s", c.path, fe.msg)
	case errors.Is(err, io.EOF):
		return localError(CodeUnavailable, err, "embedd at %s closed the connection", c.path)
	case errors.Is(err, net.ErrClosed):
		return ErrClosed
	default:
		return localError(CodeUnavailable, err, "reading from embedd at %s failed: %v", c.path, err)
	}
}

// dialConn opens a fresh connection, reporting failure as a retryable error:
// a daemon that is restarting looks exactly like this.
func dialConn(ctx context.Context, path string, timeout time.Duration, maxFrame int) (*conn, error) {
	d := net.Dialer{Timeout: timeout}
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, localError(CodeUnavailable, err, "cannot connect to embedd at %s: %v", path, unwrapOpError(err))
	}
	return newConn(nc, path, maxFrame), nil
}

// unwrapOpError drops net.OpError's "dial unix /path:" prefix, which would
// repeat the path the message already names.
func unwrapOpError(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		var sys *os.SyscallError
		if errors.As(op.Err, &sys) {
			return fmt.Errorf("%s: %w", sys.Syscall, sys.Err)
		}
		return op.Err
	}
	return err
}
