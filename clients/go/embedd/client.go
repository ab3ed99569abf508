// Package embedd is the Go client of the embedd daemon (wire protocol v1):
// music and text embeddings, similarity search and library batch jobs over a
// Unix socket.
//
// One Client holds one connection, shared by all goroutines: requests are
// pipelined and matched to their responses by id. When the daemon restarts,
// the calls in flight fail with a retryable *Error (code unavailable) and the
// next call dials again. Every method takes a context; a call whose context
// has no deadline gets the Client's default timeout.
//
//	c := embedd.New("/run/embedd/embedd.sock", embedd.Options{})
//	defer c.Close()
//	res, err := c.EmbedText(ctx, embedd.EmbedTextRequest{Text: "slow sad piano"})
//	var e *embedd.Error
//	if errors.As(err, &e) && e.Retryable() { /* back off and try again */ }
package embedd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// ProtocolVersion is the wire protocol this package speaks.
const ProtocolVersion = 1

// Default timeouts, used where Options leaves them zero.
const (
	DefaultDialTimeout = 5 * time.Second
	DefaultTimeout     = 30 * time.Second
	DefaultWorkTimeout = 10 * time.Minute
)

// Options tunes a Client; the zero value is ready to use.
type Options struct {
	// DialTimeout bounds connecting to the socket.
	DialTimeout time.Duration
	// Timeout is the default deadline of quick calls (ping, status, the
	// batch ops) whose context has none.
	Timeout time.Duration
	// WorkTimeout is the default deadline of calls that may wait for a model
	// to load and run (embed_file, embed_text, search, unload).
	WorkTimeout time.Duration
	// MaxFrame is the largest frame sent or accepted; keep it equal to the
	// daemon's max_frame.
	MaxFrame int
}

func (o Options) withDefaults() Options {
	if o.DialTimeout <= 0 {
		o.DialTimeout = DefaultDialTimeout
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.WorkTimeout <= 0 {
		o.WorkTimeout = DefaultWorkTimeout
	}
	if o.MaxFrame <= 0 {
		o.MaxFrame = DefaultMaxFrame
	}
	return o
}

// DefaultSocketPath is where the daemon listens when neither side is told
// otherwise, worked out the way the daemon does: $EMBEDD_SOCKET, else
// $XDG_RUNTIME_DIR/embedd/embedd.sock, else /run/embedd/embedd.sock for
// root and /tmp/embedd-<uid>/embedd.sock for anyone else.
func DefaultSocketPath() string {
	if p := os.Getenv("EMBEDD_SOCKET"); p != "" {
		return p
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "embedd", "embedd.sock")
	}
	if os.Geteuid() == 0 {
		return "/run/embedd/embedd.sock"
	}
	return fmt.Sprintf("/tmp/embedd-%d/embedd.sock", os.Geteuid())
}

// Client talks to one embedd daemon. It is safe for concurrent use.
type Client struct {
	path   string
	opts   Options
	nextID atomic.Uint64

	mu     sync.Mutex // guards cur and closed; held while dialing so a crowd dials once
	cur    *conn
	closed bool
}

// New returns a Client for the daemon at path ("" means DefaultSocketPath).
// It connects lazily, on the first call.
func New(path string, opts Options) *Client {
	if path == "" {
		path = DefaultSocketPath()
	}
	return &Client{path: path, opts: opts.withDefaults()}
}

// Dial returns a Client that is already connected, so a wrong path or a
// stopped daemon shows up here (as a retryable *Error).
func Dial(path string, opts Options) (*Client, error) {
	c := New(path, opts)
	ctx, cancel := context.WithTimeout(context.Background(), c.opts.DialTimeout)
	defer cancel()
	if _, err := c.conn(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Path is the socket path the Client dials.
func (c *Client) Path() string { return c.path }

// Close closes the connection; calls in flight and all later calls fail
// with ErrClosed.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.cur != nil {
		c.cur.close()
		c.cur = nil
	}
	return nil
}

// conn returns the shared connection, dialing a new one if there is none or
// the last one broke.
func (c *Client) conn(ctx context.Context) (*conn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	if c.cur != nil && c.cur.broken() == nil {
		return c.cur, nil
	}
	cn, err := dialConn(ctx, c.path, c.opts.DialTimeout, c.opts.MaxFrame)
	if err != nil {
		return nil, err
	}
	c.cur = cn
	return cn, nil
}

func (c *Client) withTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, d)
}

func (c *Client) request(op string, args map[string]any) (uint64, []byte, error) {
	id := c.nextID.Add(1)
	msg := make(map[string]any, len(args)+2)
	for k, v := range args {
		msg[k] = v
	}
	msg["id"] = id
	msg["op"] = op
	frame, err := encodeFrame(msg, c.opts.MaxFrame)
	return id, frame, err
}

// roundTrip sends one request and returns its (first) response frame.
func (c *Client) roundTrip(ctx context.Context, op string, args map[string]any) (*response, error) {
	id, frame, err := c.request(op, args)
	if err != nil {
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		cn, err := c.conn(ctx)
		if err != nil {
			return nil, err
		}
		p, err := cn.register(id, 1)
		if err != nil {
			if attempt == 0 && !errors.Is(err, ErrClosed) {
				continue // it broke since conn() looked; dial afresh
			}
			return nil, err
		}
		if err := cn.write(ctx, frame); err != nil {
			cn.unregister(id, p)
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if attempt == 0 && !errors.Is(err, ErrClosed) {
				// The daemon went away under an idle connection and never saw
				// the whole frame, so sending it again cannot do it twice.
				continue
			}
			return nil, err
		}
		r, err := cn.wait(ctx, p)
		cn.unregister(id, p)
		return r, err
	}
}

// call runs one unary op and decodes its result into out (nil: discard).
func (c *Client) call(ctx context.Context, timeout time.Duration, op string, args map[string]any, out any) error {
	ctx, cancel := c.withTimeout(ctx, timeout)
	defer cancel()
	r, err := c.roundTrip(ctx, op, args)
	if err != nil {
		return wrapCtx(op, err)
	}
	if !r.OK {
		return r.err()
	}
	if out == nil {
		return nil
	}
	if err := msgpack.Unmarshal(r.Result, out); err != nil {
		return localError(CodeInternal, err, "the %s result does not match protocol v1: %v", op, err)
	}
	return nil
}

// wrapCtx names the op in a context error and leaves contract errors as
// they are, so errors.Is(err, context.DeadlineExceeded) still works.
func wrapCtx(op string, err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("embedd %s: %w", op, err)
	}
	return err
}

// Call sends any unary op with raw arguments and returns the raw result
// map: an escape hatch for ops or arguments newer than this package (a
// streaming op returns its first frame only; use BatchWatch). Integers decode
// as int64 or uint64, floats as float64, bins as []byte.
func (c *Client) Call(ctx context.Context, op string, args map[string]any) (map[string]any, error) {
	var out map[string]any
	dec := func(raw msgpack.RawMessage) error {
		if len(raw) == 0 {
			return nil
		}
		d := msgpack.NewDecoder(bytes.NewReader(raw))
		d.UseLooseInterfaceDecoding(true)
		return d.Decode(&out)
	}
	ctx, cancel := c.withTimeout(ctx, c.opts.WorkTimeout)
	defer cancel()
	r, err := c.roundTrip(ctx, op, args)
	if err != nil {
		return nil, wrapCtx(op, err)
	}
	if !r.OK {
		return nil, r.err()
	}
	if err := dec(r.Result); err != nil {
		return nil, localError(CodeInternal, err, "the %s result is not a msgpack map: %v", op, err)
	}
	return out, nil
}

// Ping checks that the daemon answers and which protocol it speaks.
func (c *Client) Ping(ctx context.Context) (*PingResult, error) {
	var out PingResult
	if err := c.call(ctx, c.opts.Timeout, "ping", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Status reports the device, the models, the batch job, the queues and Milvus.
func (c *Client) Status(ctx context.Context) (*StatusResult, error) {
	var out StatusResult
	if err := c.call(ctx, c.opts.Timeout, "status", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// EmbedFile embeds one audio file with one or more models.
func (c *Client) EmbedFile(ctx context.Context, req EmbedFileRequest) (*EmbedFileResult, error) {
	args := map[string]any{}
	if req.Path != "" {
		args["path"] = req.Path
	}
	if req.Data != nil {
		args["data"] = req.Data
	}
	if req.Filename != "" {
		args["filename"] = req.Filename
	}
	if len(req.Models) > 0 {
		args["models"] = req.Models
	}
	if req.Store {
		args["store"] = true
	}
	if req.TrackID != "" {
		args["track_id"] = req.TrackID
	}
	if req.Name != "" {
		args["name"] = req.Name
	}
	if req.VectorFormat != "" {
		args["vector_format"] = req.VectorFormat
	}
	var out EmbedFileResult
	if err := c.call(ctx, c.opts.WorkTimeout, "embed_file", args, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// EmbedText embeds a text query (muq only in protocol v1).
func (c *Client) EmbedText(ctx context.Context, req EmbedTextRequest) (*EmbedTextResult, error) {
	args := map[string]any{"text": req.Text}
	if req.Model != "" {
		args["model"] = req.Model
	}
	if req.VectorFormat != "" {
		args["vector_format"] = req.VectorFormat
	}
	var out EmbedTextResult
	if err := c.call(ctx, c.opts.WorkTimeout, "embed_text", args, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Search returns the stored tracks nearest to a vector, a track or a text.
func (c *Client) Search(ctx context.Context, req SearchRequest) (*SearchResult, error) {
	args := map[string]any{"model": req.Model}
	if req.Vector != nil {
		args["vector"] = encodeFloat32LE(req.Vector)
	}
	if req.TrackID != "" {
		args["track_id"] = req.TrackID
	}
	if req.Text != "" {
		args["text"] = req.Text
	}
	if req.Limit != 0 {
		args["limit"] = req.Limit
	}
	if len(req.ExcludeTrackIDs) > 0 {
		args["exclude_track_ids"] = req.ExcludeTrackIDs
	}
	var out SearchResult
	if err := c.call(ctx, c.opts.WorkTimeout, "search", args, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// BatchStart starts a library job; a *Error with CodeBusy means one is running.
func (c *Client) BatchStart(ctx context.Context, req BatchStartRequest) (*BatchStartResult, error) {
	args := map[string]any{}
	if len(req.Models) > 0 {
		args["models"] = req.Models
	}
	if req.ClearExisting {
		args["clear_existing"] = true
	}
	if req.Shard != "" {
		args["shard"] = req.Shard
	}
	var out BatchStartResult
	if err := c.call(ctx, c.opts.Timeout, "batch_start", args, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

func (c *Client) progressOp(ctx context.Context, op string) (*Progress, error) {
	var out Progress
	if err := c.call(ctx, c.opts.Timeout, op, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// BatchProgress returns the current (or latest) job's progress.
func (c *Client) BatchProgress(ctx context.Context) (*Progress, error) {
	return c.progressOp(ctx, "batch_progress")
}

// BatchPause pauses the running job; CodeNotFound if there is none.
func (c *Client) BatchPause(ctx context.Context) (*Progress, error) {
	return c.progressOp(ctx, "batch_pause")
}

// BatchResume resumes the paused job; CodeNotFound if there is none.
func (c *Client) BatchResume(ctx context.Context) (*Progress, error) {
	return c.progressOp(ctx, "batch_resume")
}

// BatchCancel asks the running or paused job to stop; CodeNotFound if there
// is none.
func (c *Client) BatchCancel(ctx context.Context) (*BatchCancelResult, error) {
	var out BatchCancelResult
	if err := c.call(ctx, c.opts.Timeout, "batch_cancel", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// BatchFailures pages through the tracks the latest job could not embed.
func (c *Client) BatchFailures(ctx context.Context, req BatchFailuresRequest) (*BatchFailuresResult, error) {
	args := map[string]any{}
	if req.Limit != 0 {
		args["limit"] = req.Limit
	}
	if req.Offset != 0 {
		args["offset"] = req.Offset
	}
	var out BatchFailuresResult
	if err := c.call(ctx, c.opts.Timeout, "batch_failures", args, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Unload frees one model's memory, or every model's when model is "".
func (c *Client) Unload(ctx context.Context, model string) (*UnloadResult, error) {
	args := map[string]any{}
	if model != "" {
		args["model"] = model
	}
	var out UnloadResult
	if err := c.call(ctx, c.opts.WorkTimeout, "unload", args, &out); err != nil {
		return nil, err
	}
	return &out, nil
}
