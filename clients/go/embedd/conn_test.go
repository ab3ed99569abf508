package embedd

// Tests of the client's dispatcher against a scripted peer on a real Unix
// socket: orders and failures the real daemon cannot be made to produce on
// demand (responses in reverse order, an id-null error while calls are in
// flight, garbage). Everything the daemon can do is tested against the
// daemon itself in integration_test.go.

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

type peer struct {
	t  *testing.T
	nc net.Conn
}

// scriptedPeer listens on a fresh socket; script runs for each accepted
// connection in turn.
func scriptedPeer(t *testing.T, script ...func(p *peer)) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "edgo-peer-")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done; os.RemoveAll(dir) })
	go func() {
		defer close(done)
		for _, s := range script {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
			s(&peer{t: t, nc: nc})
			nc.Close()
		}
	}()
	return sock
}

func (p *peer) read() map[string]any {
	body, err := readFrame(p.nc, DefaultMaxFrame)
	if err != nil {
		p.t.Errorf("peer read: %v", err)
		return nil
	}
	var m map[string]any
	dec := msgpack.NewDecoder(bytes.NewReader(body))
	dec.UseLooseInterfaceDecoding(true)
	if err := dec.Decode(&m); err != nil {
		p.t.Errorf("peer decode: %v", err)
	}
	return m
}

func (p *peer) write(m map[string]any) {
	frame, err := encodeFrame(m, DefaultMaxFrame)
	if err != nil {
		p.t.Errorf("peer encode: %v", err)
		return
	}
	if _, err := p.nc.Write(frame); err != nil {
		p.t.Errorf("peer write: %v", err)
	}
}

func ok(id any, result map[string]any) map[string]any {
	return map[string]any{"id": id, "ok": true, "result": result}
}

func TestResponsesMatchedByIDOutOfOrder(t *testing.T) {
	const n = 5
	sock := scriptedPeer(t, func(p *peer) {
		var reqs []map[string]any
		for i := 0; i < n; i++ {
			reqs = append(reqs, p.read())
		}
		for i := n - 1; i >= 0; i-- { // answer newest first
			r := reqs[i]
			p.write(ok(r["id"], map[string]any{"echo": r["tag"]}))
		}
	})
	c := New(sock, Options{})
	defer c.Close()
	type answer struct {
		tag int
		got any
		err error
	}
	answers := make(chan answer, n)
	for i := 0; i < n; i++ {
		go func(i int) {
			res, err := c.Call(context.Background(), "echo", map[string]any{"tag": i})
			answers <- answer{i, res["echo"], err}
		}(i)
	}
	for i := 0; i < n; i++ {
		a := <-answers
		if a.err != nil {
			t.Fatal(a.err)
		}
		if a.got != int64(a.tag) {
			t.Fatalf("request %d got the answer of %v", a.tag, a.got)
		}
	}
}

func TestIDNullErrorFailsAllInFlightAndCloses(t *testing.T) {
	sock := scriptedPeer(t,
		func(p *peer) {
			p.read()
			p.read()
			p.write(map[string]any{"id": nil, "ok": false, "error": map[string]any{"code": "bad_frame", "message": "frame length 0 is outside 1..67108864 bytes"}})
		},
		func(p *peer) { // the next call dials again
			r := p.read()
			p.write(ok(r["id"], map[string]any{"version": "v", "protocol": 1, "uptime_s": 0.0}))
		},
	)
	c := New(sock, Options{})
	defer c.Close()
	errs := make(chan error, 2)
	for i := 0; i < 2; i++ {
		go func() { _, err := c.Status(context.Background()); errs <- err }()
	}
	for i := 0; i < 2; i++ {
		err := <-errs
		var e *Error
		if !errors.As(err, &e) || e.Code != CodeBadFrame || e.Message == "" {
			t.Fatalf("in-flight call: want bad_frame, got %v", err)
		}
	}
	if _, err := c.Ping(context.Background()); err != nil {
		t.Fatalf("call after bad_frame: %v", err)
	}
}

func TestMalformedFrameFromPeer(t *testing.T) {
	sock := scriptedPeer(t, func(p *peer) {
		p.read()
		_, _ = p.nc.Write([]byte{0, 0, 0, 2, 0x92, 0x01}) // a 2-byte frame holding an array, not a map
	})
	c := New(sock, Options{})
	defer c.Close()
	_, err := c.Ping(context.Background())
	if !IsCode(err, CodeBadFrame) {
		t.Fatalf("want bad_frame, got %v", err)
	}
}

func TestPeerGoneIsRetryable(t *testing.T) {
	sock := scriptedPeer(t, func(p *peer) { p.read() /* then hang up without answering */ })
	c := New(sock, Options{})
	defer c.Close()
	_, err := c.Ping(context.Background())
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeUnavailable || !e.Retryable() {
		t.Fatalf("want a retryable unavailable, got %v", err)
	}
}

func TestStreamingFramesShareTheID(t *testing.T) {
	sock := scriptedPeer(t, func(p *peer) {
		r := p.read()
		if r["op"] != "batch_watch" || r["interval_s"] != 0.25 {
			t.Errorf("watch request: %v", r)
		}
		for i, st := range []string{"running", "running", "completed"} {
			m := ok(r["id"], map[string]any{"status": st, "processed_tracks": i, "total_tracks": 2})
			m["more"] = st != "completed"
			p.write(m)
		}
		// After more:false the client closes the watch connection; a stray
		// frame must not surface (and the write may fail with EPIPE).
		if frame, err := encodeFrame(ok(r["id"], map[string]any{"status": "stray"}), DefaultMaxFrame); err == nil {
			_, _ = p.nc.Write(frame)
		}
	})
	c := New(sock, Options{})
	defer c.Close()
	w, err := c.BatchWatch(context.Background(), WatchOptions{Interval: 250 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var got []string
	for w.Next() {
		got = append(got, w.Progress().Status)
	}
	if w.Err() != nil {
		t.Fatal(w.Err())
	}
	if len(got) != 3 || got[2] != "completed" {
		t.Fatalf("frames: %v", got)
	}
}

func TestCancelledCallLeavesNoPendingEntry(t *testing.T) {
	release := make(chan struct{})
	sock := scriptedPeer(t, func(p *peer) {
		r := p.read()
		<-release
		p.write(ok(r["id"], map[string]any{"version": "late"})) // nobody is waiting any more
		r = p.read()
		p.write(ok(r["id"], map[string]any{"version": "v2"}))
	})
	c := New(sock, Options{})
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	_, err := c.Ping(ctx)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want DeadlineExceeded, got %v", err)
	}
	if n := c.cur.pendingCount(); n != 0 {
		t.Fatalf("%d pending entries left after a timed-out call", n)
	}
	close(release)
	res, err := c.Ping(context.Background())
	if err != nil || res.Version != "v2" {
		t.Fatalf("the late answer leaked into the next call: %+v %v", res, err)
	}
}

func TestDialFailureIsRetryable(t *testing.T) {
	c := New(filepath.Join(t.TempDir(), "nobody.sock"), Options{})
	_, err := c.Ping(context.Background())
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeUnavailable || !IsRetryable(err) {
		t.Fatalf("want a retryable unavailable, got %v", err)
	}
	if _, err := Dial(filepath.Join(t.TempDir(), "nobody.sock"), Options{}); !IsRetryable(err) {
		t.Fatalf("Dial: want retryable, got %v", err)
	}
}

func TestClosedClient(t *testing.T) {
	c := New("/nonexistent.sock", Options{})
	c.Close()
	if _, err := c.Ping(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("want ErrClosed, got %v", err)
	}
	if _, err := c.BatchWatch(context.Background(), WatchOptions{}); !errors.Is(err, ErrClosed) {
		t.Fatalf("watch: want ErrClosed, got %v", err)
	}
}
