package embedd

// Integration tests against a real embedd daemon (see daemon_test.go).

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// expected is what the daemon under test answers today for each case of
// TestOps, as an error code; a case that is missing (or "") must succeed and
// then has its result checked. Ops that have not landed in the daemon yet
// answer `unavailable`. When an op lands, delete its line (or change it to
// the code the contract gives for that case, noted on the right) and the
// success checks take over.
var expected = map[string]Code{
	"embed_file_missing":   CodeNotFound,
	"embed_file_forbidden": CodeForbidden,
	"batch_start":          CodeUnavailable, // no Navidrome library is configured for this daemon
	"batch_cancel":         CodeNotFound,    // no job is running
	"batch_pause":          CodeNotFound,
	"batch_resume":         CodeNotFound,
}

// outcome asserts the expected answer for case key; it returns true when the
// call was expected to succeed (and did), so the caller checks the result.
func outcome(t *testing.T, key string, err error) bool {
	t.Helper()
	want := expected[key]
	if want == "" {
		if err != nil {
			t.Fatalf("%s: want success, got %v", key, err)
		}
		return true
	}
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("%s: want an *embedd.Error %q, got %v", key, want, err)
	}
	if e.Code != want || e.Message == "" {
		t.Fatalf("%s: want code %q with a message, got %q: %q", key, want, e.Code, e.Message)
	}
	return false
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func norm(v []float32) float64 {
	var s float64
	for _, f := range v {
		s += float64(f) * float64(f)
	}
	return math.Sqrt(s)
}

func checkHits(t *testing.T, hits []Hit, limit int) {
	t.Helper()
	if len(hits) > limit {
		t.Fatalf("%d hits for limit %d", len(hits), limit)
	}
	if !sort.SliceIsSorted(hits, func(i, j int) bool { return hits[i].Score > hits[j].Score }) {
		t.Fatalf("hits are not best first: %+v", hits)
	}
	for _, h := range hits {
		if h.TrackID == "" {
			t.Fatalf("hit without track_id: %+v", h)
		}
	}
}

var progressStatuses = map[string]bool{
	StatusIdle: true, StatusRunning: true, StatusPaused: true, StatusCancelling: true,
	StatusCompleted: true, StatusCompletedWithErrors: true, StatusFailed: true, StatusCancelled: true,
}

func checkProgress(t *testing.T, p *Progress) {
	t.Helper()
	if !progressStatuses[p.Status] {
		t.Fatalf("progress status %q is not one of the contract's", p.Status)
	}
	if p.ProcessedTracks < 0 || p.FailedTracks < 0 || p.SkippedTracks < 0 || p.ProgressPercent < 0 || p.ProgressPercent > 100 {
		t.Fatalf("progress out of range: %+v", p)
	}
}

// TestOps runs every op of the contract once, in an order where later cases
// can use what earlier ones stored.
func TestOps(t *testing.T) {
	d := sharedDaemon(t)
	c := New(d.sock, Options{})
	defer c.Close()
	ctx := testCtx(t)

	var status *StatusResult
	t.Run("ping", func(t *testing.T) {
		p, err := c.Ping(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if p.Protocol != ProtocolVersion || p.Version == "" || p.UptimeS < 0 {
			t.Fatalf("ping: %+v", p)
		}
	})
	t.Run("status", func(t *testing.T) {
		var err error
		status, err = c.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]struct {
			collection string
			text       bool
		}{
			ModelMuQ: {"embedding", true}, ModelMERT: {"mert_embedding", false}, ModelLatent: {"latent_embedding", false},
		}
		if len(status.Models) != len(want) {
			t.Fatalf("models: %+v", status.Models)
		}
		for name, w := range want {
			m, ok := status.Models[name]
			if !ok || m.Collection != w.collection || m.Text != w.text || m.Dim <= 0 || m.State == "" {
				t.Fatalf("model %s: %+v", name, m)
			}
		}
		if status.Executor == nil || len(status.Executor.Lanes) != 2 || status.Executor.Lanes["batch"].Nice < 0 {
			t.Fatalf("executor: %+v", status.Executor)
		}
		if status.Version == "" || status.Device == "" || status.Milvus.URI == "" || status.Queue.Interactive < 0 || status.Queue.Batch < 0 {
			t.Fatalf("status: %+v", status)
		}
		if status.Batch != nil {
			checkProgress(t, status.Batch)
		}
	})
	if status == nil {
		t.FailNow()
	}

	wavPath := filepath.Join(d.music, "tone.wav")
	wav := writeWAV(t, wavPath, 24000, 3, 440)
	var stored Vector
	t.Run("embed_file", func(t *testing.T) {
		models := []string{ModelMuQ, ModelMERT, ModelLatent}
		res, err := c.EmbedFile(ctx, EmbedFileRequest{
			Path: wavPath, Models: models, Store: true, TrackID: "go-track-1", Name: "Go tone",
		})
		if !outcome(t, "embed_file", err) {
			return
		}
		if math.Abs(res.DurationS-3) > 0.1 {
			t.Fatalf("duration_s %v for a 3 s file", res.DurationS)
		}
		for _, name := range models {
			m, ok := res.Models[name]
			if !ok || m.Dim != len(m.Vector) || m.Dim != status.Models[name].Dim || m.Windows < 1 {
				t.Fatalf("%s: dim %d, %d values, %d windows (status dim %d)", name, m.Dim, len(m.Vector), m.Windows, status.Models[name].Dim)
			}
			if n := norm(m.Vector); math.Abs(n-1) > 1e-3 {
				t.Fatalf("%s: stored vectors are L2-normalised, got norm %v", name, n)
			}
		}
		stored = res.Models[ModelMuQ].Vector
	})
	t.Run("embed_file_upload", func(t *testing.T) {
		res, err := c.EmbedFile(ctx, EmbedFileRequest{Data: wav, Filename: "tone.wav", VectorFormat: VectorFormatList})
		if !outcome(t, "embed_file_upload", err) {
			return
		}
		got := res.Models[ModelMuQ].Vector
		if stored != nil {
			// The same audio, asked for as a list instead of a bin.
			if len(got) != len(stored) {
				t.Fatalf("upload gave %d values, path gave %d", len(got), len(stored))
			}
			for i := range got {
				if math.Abs(float64(got[i]-stored[i])) > 1e-4 {
					t.Fatalf("value %d: upload %v, path %v", i, got[i], stored[i])
				}
			}
		}
	})
	t.Run("embed_file_missing", func(t *testing.T) {
		_, err := c.EmbedFile(ctx, EmbedFileRequest{Path: filepath.Join(d.music, "no-such-file.flac")})
		if outcome(t, "embed_file_missing", err) {
			t.Fatal("embedding a missing file succeeded")
		}
	})
	t.Run("embed_file_forbidden", func(t *testing.T) {
		_, err := c.EmbedFile(ctx, EmbedFileRequest{Path: "/etc/hostname"})
		if outcome(t, "embed_file_forbidden", err) {
			t.Fatal("embedding a file outside the allowed roots succeeded")
		}
	})
	t.Run("embed_text", func(t *testing.T) {
		res, err := c.EmbedText(ctx, EmbedTextRequest{Text: "calm piano music for a rainy evening"})
		if !outcome(t, "embed_text", err) {
			return
		}
		if res.Model != ModelMuQ || res.Dim != len(res.Vector) || res.Dim != status.Models[ModelMuQ].Dim || len(res.Raw) == 0 {
			t.Fatalf("embed_text: model %q dim %d, %d values, %d raw", res.Model, res.Dim, len(res.Vector), len(res.Raw))
		}
	})
	t.Run("search_vector", func(t *testing.T) {
		vec := stored
		if vec == nil {
			vec = make([]float32, status.Models[ModelMuQ].Dim)
			vec[0] = 1
		}
		res, err := c.Search(ctx, SearchRequest{Model: ModelMuQ, Vector: vec, Limit: 5})
		if !outcome(t, "search_vector", err) {
			return
		}
		checkHits(t, res.Hits, 5)
		if stored != nil && (len(res.Hits) == 0 || res.Hits[0].TrackID != "go-track-1") {
			t.Fatalf("searching with a stored vector did not find its track first: %+v", res.Hits)
		}
	})
	t.Run("search_track", func(t *testing.T) {
		res, err := c.Search(ctx, SearchRequest{Model: ModelMuQ, TrackID: "go-track-1", Limit: 10, ExcludeTrackIDs: []string{"go-track-1"}})
		if !outcome(t, "search_track", err) {
			return
		}
		checkHits(t, res.Hits, 10)
		for _, h := range res.Hits {
			if h.TrackID == "go-track-1" {
				t.Fatal("an excluded track came back")
			}
		}
	})
	t.Run("search_text", func(t *testing.T) {
		res, err := c.Search(ctx, SearchRequest{Model: ModelMuQ, Text: "a sad violin melody", Limit: 3})
		if !outcome(t, "search_text", err) {
			return
		}
		checkHits(t, res.Hits, 3)
	})

	t.Run("batch_progress", func(t *testing.T) {
		p, err := c.BatchProgress(ctx)
		if outcome(t, "batch_progress", err) {
			checkProgress(t, p)
		}
	})
	t.Run("batch_watch", func(t *testing.T) {
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		w, err := c.BatchWatch(wctx, WatchOptions{Interval: 100 * time.Millisecond})
		if err != nil {
			t.Fatal(err) // the request itself is always sent; errors arrive through Next
		}
		defer w.Close()
		if !w.Next() {
			outcome(t, "batch_watch", w.Err())
			if expected["batch_watch"] == "" {
				t.Fatal("batch_watch gave no first frame")
			}
			return
		}
		outcome(t, "batch_watch", nil)
		checkProgress(t, w.Progress())
		if w.Progress().Final() || w.Progress().Status == StatusIdle {
			for w.Next() {
			}
			if w.Err() != nil {
				t.Fatalf("a watch of a finished job ended with %v", w.Err())
			}
			return
		}
		cancel() // ctx ends the stream early
		for w.Next() {
		}
		if !errors.Is(w.Err(), context.Canceled) {
			t.Fatalf("want context.Canceled after cancel, got %v", w.Err())
		}
	})
	t.Run("batch_start", func(t *testing.T) {
		res, err := c.BatchStart(ctx, BatchStartRequest{Models: []string{ModelMuQ}, Shard: "0/1"})
		if !outcome(t, "batch_start", err) {
			return
		}
		if res.JobID == "" || res.TotalTracks < 0 {
			t.Fatalf("batch_start: %+v", res)
		}
		// Leave no job running for the cases below.
		if _, err := c.BatchCancel(ctx); err != nil && !IsCode(err, CodeNotFound) {
			t.Fatal(err)
		}
		w, err := c.BatchWatch(ctx, WatchOptions{Interval: 100 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		var last *Progress
		for w.Next() {
			last = w.Progress()
		}
		if w.Err() != nil || last == nil || !last.Final() {
			t.Fatalf("the cancelled job did not reach a final status: %+v %v", last, w.Err())
		}
	})
	t.Run("batch_cancel", func(t *testing.T) {
		res, err := c.BatchCancel(ctx)
		if outcome(t, "batch_cancel", err) && res.Status != StatusCancelling {
			t.Fatalf("batch_cancel: %+v", res)
		}
	})
	t.Run("batch_pause", func(t *testing.T) {
		p, err := c.BatchPause(ctx)
		if outcome(t, "batch_pause", err) {
			checkProgress(t, p)
		}
	})
	t.Run("batch_resume", func(t *testing.T) {
		p, err := c.BatchResume(ctx)
		if outcome(t, "batch_resume", err) {
			checkProgress(t, p)
		}
	})
	t.Run("batch_failures", func(t *testing.T) {
		res, err := c.BatchFailures(ctx, BatchFailuresRequest{Limit: 10})
		if !outcome(t, "batch_failures", err) {
			return
		}
		if res.Total < len(res.Failures) || len(res.Failures) > 10 {
			t.Fatalf("batch_failures: %+v", res)
		}
	})
	t.Run("unload", func(t *testing.T) {
		res, err := c.Unload(ctx, ModelMuQ)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range res.Unloaded {
			if m != ModelMuQ {
				t.Fatalf("unload muq unloaded %q", m)
			}
		}
		all, err := c.Unload(ctx, "")
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range all.Unloaded {
			if _, ok := status.Models[m]; !ok {
				t.Fatalf("unload reported an unknown model %q", m)
			}
		}
		after, err := c.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for name, m := range after.Models {
			if m.Loaded {
				t.Fatalf("%s is still loaded after unload of all models", name)
			}
		}
	})
}

// TestContractErrors checks that the daemon's contract errors reach the
// caller as *Error with the right code and a message naming the culprit.
func TestContractErrors(t *testing.T) {
	d := sharedDaemon(t)
	c := New(d.sock, Options{})
	defer c.Close()
	ctx := testCtx(t)

	cases := []struct {
		name    string
		call    func() error
		code    Code
		mention string
	}{
		{"unknown argument", func() error {
			_, err := c.Call(ctx, "ping", map[string]any{"bogus_key": 1})
			return err
		}, CodeBadRequest, "bogus_key"},
		{"unknown op", func() error {
			_, err := c.Call(ctx, "make_coffee", nil)
			return err
		}, CodeUnknownOp, "make_coffee"},
		{"empty text", func() error {
			_, err := c.EmbedText(ctx, EmbedTextRequest{Text: ""})
			return err
		}, CodeBadRequest, "text"},
		{"limit out of range", func() error {
			_, err := c.Search(ctx, SearchRequest{Model: ModelMuQ, Text: "x", Limit: 5000})
			return err
		}, CodeBadRequest, "limit"},
		{"two queries", func() error {
			_, err := c.Search(ctx, SearchRequest{Model: ModelMuQ, Text: "x", TrackID: "t"})
			return err
		}, CodeBadRequest, "exactly one"},
		{"unknown model", func() error {
			_, err := c.Unload(ctx, "wav2vec")
			return err
		}, CodeBadRequest, "model"},
		{"store without track_id", func() error {
			_, err := c.EmbedFile(ctx, EmbedFileRequest{Path: "/x.flac", Store: true})
			return err
		}, CodeBadRequest, "track_id"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			var e *Error
			if !errors.As(err, &e) || e.Code != tc.code {
				t.Fatalf("want %s, got %v", tc.code, err)
			}
			if !strings.Contains(e.Message, tc.mention) {
				t.Fatalf("message %q does not name %q", e.Message, tc.mention)
			}
			if e.Retryable() {
				t.Fatalf("%s must not be retryable", e.Code)
			}
		})
	}
	// Contract errors leave the connection usable.
	if _, err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestConcurrentUse hammers one Client from 50 goroutines: every answer must
// reach the goroutine that asked (each bad_request names a key unique to its
// request), over one shared, pipelined connection.
func TestConcurrentUse(t *testing.T) {
	d := sharedDaemon(t)
	c := New(d.sock, Options{})
	defer c.Close()
	ctx := testCtx(t)
	if _, err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	first := c.cur

	const goroutines, rounds = 50, 20
	var wg sync.WaitGroup
	var calls atomic.Int64
	errs := make(chan error, goroutines)
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < rounds; i++ {
				switch i % 3 {
				case 0:
					p, err := c.Ping(ctx)
					if err != nil || p.Protocol != ProtocolVersion {
						errs <- fmt.Errorf("ping %d/%d: %+v %v", g, i, p, err)
						return
					}
				case 1:
					key := fmt.Sprintf("k_%d_%d", g, i)
					_, err := c.Call(ctx, "ping", map[string]any{key: true})
					var e *Error
					if !errors.As(err, &e) || e.Code != CodeBadRequest || !strings.Contains(e.Message, "'"+key+"'") {
						errs <- fmt.Errorf("request %s got someone else's answer: %v", key, err)
						return
					}
				case 2:
					s, err := c.Status(ctx)
					if err != nil || len(s.Models) != 3 {
						errs <- fmt.Errorf("status %d/%d: %v", g, i, err)
						return
					}
				}
				calls.Add(1)
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if calls.Load() != goroutines*rounds {
		t.Fatalf("%d of %d calls succeeded", calls.Load(), goroutines*rounds)
	}
	if c.cur != first {
		t.Fatal("the client dialed again instead of reusing its connection")
	}
	if n := first.pendingCount(); n != 0 {
		t.Fatalf("%d pending entries left", n)
	}
}

// TestTimeoutsLeaveNoPendingEntries abandons many calls at random points
// (before, during and after the daemon answers): none may leak, and late
// answers must not confuse later calls.
func TestTimeoutsLeaveNoPendingEntries(t *testing.T) {
	d := sharedDaemon(t)
	c := New(d.sock, Options{})
	defer c.Close()
	if _, err := c.Ping(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var timedOut atomic.Int64
	for g := 0; g < 10; g++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed))
			for i := 0; i < 30; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rng.Intn(2000))*time.Microsecond)
				_, err := c.Status(ctx)
				cancel()
				if errors.Is(err, context.DeadlineExceeded) {
					timedOut.Add(1)
				} else if err != nil {
					t.Errorf("status: %v", err)
				}
			}
		}(int64(g))
	}
	wg.Wait()
	t.Logf("%d of 300 calls timed out", timedOut.Load())
	if n := c.cur.pendingCount(); n != 0 {
		t.Fatalf("%d pending entries leaked", n)
	}
	for i := 0; i < 5; i++ {
		p, err := c.Ping(testCtx(t))
		if err != nil || p.Protocol != ProtocolVersion {
			t.Fatalf("after timeouts: %+v %v", p, err)
		}
	}
}

// TestBadFrameFromDaemon sends garbage on the client's own connection: the
// daemon answers bad_frame with id nil and closes; calls in flight get that
// error and the next call dials again.
func TestBadFrameFromDaemon(t *testing.T) {
	d := sharedDaemon(t)
	c := New(d.sock, Options{})
	defer c.Close()
	ctx := testCtx(t)
	if _, err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	cn := c.cur
	const id = 1 << 40 // stands for a request in flight
	p, err := cn.register(id, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := cn.write(ctx, []byte{0, 0, 0, 0}); err != nil { // a zero-length frame
		t.Fatal(err)
	}
	_, err = cn.wait(ctx, p)
	cn.unregister(id, p)
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeBadFrame || e.Message == "" {
		t.Fatalf("in-flight call: want bad_frame, got %v", err)
	}
	if _, err := c.Ping(ctx); err != nil {
		t.Fatalf("next call: %v", err)
	}
	if c.cur == cn {
		t.Fatal("the client kept using the closed connection")
	}
}

// TestDaemonRestart stops the daemon with SIGTERM while goroutines are using
// the client, starts it again on the same socket, and expects the client to
// carry on: calls during the outage fail with a retryable error, calls after
// it succeed without any action by the caller.
func TestDaemonRestart(t *testing.T) {
	d := ownDaemon(t)
	c := New(d.sock, Options{})
	defer c.Close()
	ctx := testCtx(t)
	before, err := c.Ping(ctx)
	if err != nil {
		t.Fatal(err)
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var okCalls, failedCalls atomic.Int64
	bad := make(chan error, 100)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				_, err := c.Status(ctx)
				if err == nil {
					okCalls.Add(1)
					continue
				}
				failedCalls.Add(1)
				if !IsRetryable(err) && !IsCode(err, CodeCancelled) {
					select {
					case bad <- err:
					default:
					}
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	if err := d.stop(); err != nil {
		t.Fatal(err)
	}
	_, err = c.Ping(ctx)
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeUnavailable || !e.Retryable() {
		t.Fatalf("a call while the daemon is down: want a retryable unavailable, got %v", err)
	}
	restarted := time.Now()
	if err := d.start(); err != nil {
		t.Fatal(err)
	}
	after, err := c.Ping(ctx)
	if err != nil {
		t.Fatalf("the first call after the restart failed: %v", err)
	}
	if after.UptimeS > time.Since(restarted).Seconds()+0.5 {
		t.Fatalf("uptime %v s (was %v s): not the new daemon?", after.UptimeS, before.UptimeS)
	}
	okBefore := okCalls.Load()
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wg.Wait()
	close(bad)
	for err := range bad {
		t.Errorf("a call during the restart failed with a non-retryable error: %v", err)
	}
	if okCalls.Load() <= okBefore {
		t.Fatal("the goroutines did not recover after the restart")
	}
	if failedCalls.Load() == 0 {
		t.Fatal("no call saw the outage; the test did not test anything")
	}
	t.Logf("%d calls succeeded, %d failed retryably across the restart", okCalls.Load(), failedCalls.Load())
}
