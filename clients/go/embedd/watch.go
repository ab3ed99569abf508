package embedd

import (
	"context"
	"errors"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// WatchOptions tunes BatchWatch.
type WatchOptions struct {
	// Interval is the least time between two progress frames; 0 takes the
	// daemon's default (1 s). The daemon accepts 50 ms .. 1 h.
	Interval time.Duration
}

// Watcher iterates over the progress frames of batch_watch:
//
//	w, err := c.BatchWatch(ctx, embedd.WatchOptions{})
//	if err != nil { ... }
//	defer w.Close()
//	for w.Next() {
//		p := w.Progress()
//		...
//	}
//	if err := w.Err(); err != nil { ... }
//
// The stream ends after the frame that carries the job's final status.
// Cancelling ctx (or Close) ends it early; Err then reports the context's
// error. A Watcher belongs to one goroutine: to stop it from another, cancel
// ctx rather than calling Close.
type Watcher struct {
	ctx  context.Context
	cn   *conn
	id   uint64
	p    *pendingCall
	cur  *Progress
	err  error
	last bool // the final frame has been delivered
	done bool // Next will return false from now on
}

// BatchWatch streams the batch job's progress on a connection of its own, so
// that a slow reader never holds up other calls and cancelling closes the
// stream on the daemon's side too. The Client's default timeouts do not
// apply: the stream lasts as long as the job, or until ctx ends.
func (c *Client) BatchWatch(ctx context.Context, opts WatchOptions) (*Watcher, error) {
	args := map[string]any{}
	if opts.Interval > 0 {
		args["interval_s"] = opts.Interval.Seconds()
	}
	id, frame, err := c.request("batch_watch", args)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	dctx, cancel := context.WithTimeout(ctx, c.opts.DialTimeout)
	defer cancel()
	cn, err := dialConn(dctx, c.path, c.opts.DialTimeout, c.opts.MaxFrame)
	if err != nil {
		return nil, wrapCtx("batch_watch", err)
	}
	p, err := cn.register(id, 4)
	if err != nil {
		cn.close()
		return nil, err
	}
	wctx, wcancel := context.WithTimeout(ctx, c.opts.Timeout)
	err = cn.write(wctx, frame)
	wcancel()
	if err != nil {
		cn.unregister(id, p)
		cn.close()
		return nil, wrapCtx("batch_watch", err)
	}
	return &Watcher{ctx: ctx, cn: cn, id: id, p: p}, nil
}

// Next waits for the next progress frame and reports whether there is one.
func (w *Watcher) Next() bool {
	if w.done {
		return false
	}
	if w.last {
		w.finish(nil)
		return false
	}
	r, err := w.cn.wait(w.ctx, w.p)
	if err != nil {
		w.finish(wrapCtx("batch_watch", err))
		return false
	}
	if !r.OK {
		w.finish(r.err())
		return false
	}
	var p Progress
	if err := msgpack.Unmarshal(r.Result, &p); err != nil {
		w.finish(localError(CodeInternal, err, "a batch_watch frame does not match protocol v1: %v", err))
		return false
	}
	w.cur = &p
	w.last = !r.More
	return true
}

// Progress is the frame the last successful Next read.
func (w *Watcher) Progress() *Progress { return w.cur }

// Err is why the stream ended early; nil after the final frame.
func (w *Watcher) Err() error { return w.err }

// Close ends the stream and its connection; it is safe to call more than
// once and after the stream has ended.
func (w *Watcher) Close() error {
	if !w.done {
		w.finish(nil)
	}
	return nil
}

func (w *Watcher) finish(err error) {
	w.done = true
	if err != nil && !errors.Is(err, ErrClosed) {
		w.err = err
	}
	w.cn.unregister(w.id, w.p)
	w.cn.close()
}
