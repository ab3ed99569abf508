package embedd

// A real embedd daemon for the integration tests: `python -m embedd serve`
// in a subprocess with its own socket and data dir, run from the repository
// so that it serves the code under test.
//
// EMBEDD_PYTHON picks the interpreter (default <repo>/.venv/bin/python);
// EMBEDD_PYTHON=skip skips every test that needs a daemon. Otherwise a
// daemon that cannot start fails those tests: CI must not go green on a
// missing daemon. EMBEDD_REPO overrides the repository root;
// EMBEDD_START_TIMEOUT_S (default 120) bounds the start-up.

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

type daemon struct {
	root    string // short temp dir: a socket path must fit in 107 bytes
	sock    string
	dataDir string
	music   string // a directory embed_file may read
	logPath string
	args    []string

	cmd    *exec.Cmd
	exited chan struct{}
	logF   *os.File
}

func repoRoot() (string, error) {
	if r := os.Getenv("EMBEDD_REPO"); r != "" {
		return r, nil
	}
	// go test runs in the package directory: <repo>/clients/go/embedd.
	r, err := filepath.Abs(filepath.Join("..", "..", ".."))
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(filepath.Join(r, "embedd", "__main__.py")); err != nil {
		return "", fmt.Errorf("cannot find the embedd repository at %s (set EMBEDD_REPO): %w", r, err)
	}
	return r, nil
}

func pythonPath(repo string) string {
	if p := os.Getenv("EMBEDD_PYTHON"); p != "" {
		return p
	}
	return filepath.Join(repo, ".venv", "bin", "python")
}

func skipDaemon() bool { return os.Getenv("EMBEDD_PYTHON") == "skip" }

var tinyModels struct {
	once sync.Once
	args []string
	err  error
}

// tinyModelArgs builds (once, cached under <repo>/.cache) the random-weight
// models of tests/tiny_models.py and returns the serve arguments that load
// them, so that the model ops can run for real with no weights downloaded.
func tinyModelArgs(repo, python string) ([]string, error) {
	tinyModels.once.Do(func() {
		script := filepath.Join(repo, "tests", "tiny_models.py")
		if _, err := os.Stat(script); err != nil {
			return // no tiny models in this checkout: the daemon runs with its defaults
		}
		dir := filepath.Join(repo, ".cache", "go-client-tiny-models")
		cmd := exec.Command(python, script, dir)
		cmd.Dir = repo
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			tinyModels.err = fmt.Errorf("building tiny models: %v\n%s", err, tail(stderr.String(), 3000))
			return
		}
		// Libraries print to stdout too; the JSON is the last thing printed.
		if i := bytes.LastIndex(out, []byte("\n{")); i >= 0 {
			out = out[i+1:]
		}
		var sources map[string]string
		if err := json.Unmarshal(out, &sources); err != nil {
			tinyModels.err = fmt.Errorf("tiny_models.py printed no JSON: %v\n%s", err, out)
			return
		}
		tinyModels.args = []string{
			"--muq-model", sources["muq"],
			"--mert-model", sources["mert"],
			"--latent-model", sources["latent"],
		}
	})
	return tinyModels.args, tinyModels.err
}

// newDaemon prepares (but does not start) a daemon in a fresh temp dir.
func newDaemon() (*daemon, error) {
	root, err := os.MkdirTemp("/tmp", "edgo-")
	if err != nil {
		return nil, err
	}
	d := &daemon{
		root:    root,
		sock:    filepath.Join(root, "embedd.sock"),
		dataDir: filepath.Join(root, "data"),
		music:   filepath.Join(root, "music"),
		logPath: filepath.Join(root, "daemon.log"),
	}
	if err := os.MkdirAll(d.music, 0o755); err != nil {
		return nil, err
	}
	return d, nil
}

// start launches the daemon and waits until it answers ping.
func (d *daemon) start() error {
	repo, err := repoRoot()
	if err != nil {
		return err
	}
	python := pythonPath(repo)
	if d.args == nil {
		models, err := tinyModelArgs(repo, python)
		if err != nil {
			return err
		}
		d.args = append([]string{"--allowed-roots", d.music}, models...)
		if extra := os.Getenv("EMBEDD_DAEMON_ARGS"); extra != "" {
			d.args = append(d.args, strings.Fields(extra)...)
		}
	}
	d.logF, err = os.OpenFile(d.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	args := append([]string{"-m", "embedd", "serve", "--socket", d.sock, "--data-dir", d.dataDir}, d.args...)
	cmd := exec.Command(python, args...)
	cmd.Dir = repo
	cmd.Env = daemonEnv()
	cmd.Stdout = d.logF
	cmd.Stderr = d.logF
	// Its own process group (so a hung daemon and its workers can be killed
	// together), and it dies with the test binary if that is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		d.logF.Close()
		return fmt.Errorf("starting the daemon with %s: %w", python, err)
	}
	d.cmd = cmd
	d.exited = make(chan struct{})
	go func() { _ = cmd.Wait(); close(d.exited) }()
	return d.waitReady()
}

// daemonEnv is the test's environment minus anything that would point the
// daemon elsewhere (a user's EMBEDD_* settings, systemd's variables).
func daemonEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k := kv[:strings.IndexByte(kv, '=')]
		if strings.HasPrefix(k, "EMBEDD_") || strings.HasPrefix(k, "NAVIDROME_") || strings.HasPrefix(k, "LISTEN_") ||
			k == "NOTIFY_SOCKET" || strings.HasPrefix(k, "WATCHDOG_") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "EMBEDD_DEVICE=cpu")
}

func (d *daemon) waitReady() error {
	timeout := 120 * time.Second
	if s, err := strconv.Atoi(os.Getenv("EMBEDD_START_TIMEOUT_S")); err == nil && s > 0 {
		timeout = time.Duration(s) * time.Second
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-d.exited:
			return fmt.Errorf("the daemon exited during start-up (%v):\n%s", d.cmd.ProcessState, d.logTail())
		default:
		}
		if rawPing(d.sock) == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.kill()
	return fmt.Errorf("the daemon did not answer ping within %v:\n%s", timeout, d.logTail())
}

// rawPing is one ping on a connection of its own, independent of Client.
func rawPing(sock string) error {
	nc, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return err
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(2 * time.Second))
	frame, err := encodeFrame(map[string]any{"op": "ping"}, DefaultMaxFrame)
	if err != nil {
		return err
	}
	if _, err := nc.Write(frame); err != nil {
		return err
	}
	body, err := readFrame(nc, DefaultMaxFrame)
	if err != nil {
		return err
	}
	r, err := decodeResponse(body)
	if err != nil {
		return err
	}
	if !r.OK {
		return r.err()
	}
	return nil
}

// stop sends SIGTERM and waits for a clean exit, killing the process group
// if it takes too long.
func (d *daemon) stop() error {
	if d.cmd == nil {
		return nil
	}
	defer d.logF.Close()
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(30 * time.Second):
		d.kill()
		return fmt.Errorf("the daemon ignored SIGTERM for 30 s:\n%s", d.logTail())
	}
	if st := d.cmd.ProcessState; st != nil && !st.Success() {
		return fmt.Errorf("the daemon exited with %v after SIGTERM:\n%s", st, d.logTail())
	}
	return nil
}

func (d *daemon) kill() {
	_ = syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
	<-d.exited
}

func (d *daemon) cleanup() {
	if d.cmd != nil {
		select {
		case <-d.exited:
		default:
			_ = d.stop()
		}
	}
	_ = os.RemoveAll(d.root)
}

func (d *daemon) logTail() string {
	b, _ := os.ReadFile(d.logPath)
	return tail(string(b), 6000)
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

var shared struct {
	once sync.Once
	d    *daemon
	err  error
}

// sharedDaemon is one daemon for the tests that do not stop it.
func sharedDaemon(t *testing.T) *daemon {
	t.Helper()
	if skipDaemon() {
		t.Skip("EMBEDD_PYTHON=skip: no daemon")
	}
	shared.once.Do(func() {
		shared.d, shared.err = newDaemon()
		if shared.err == nil {
			shared.err = shared.d.start()
		}
	})
	if shared.err != nil {
		t.Fatalf("cannot start the embedd daemon: %v", shared.err)
	}
	d := shared.d
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon log (%s):\n%s", d.logPath, d.logTail())
		}
	})
	return d
}

// ownDaemon is a daemon for one test that stops or restarts it.
func ownDaemon(t *testing.T) *daemon {
	t.Helper()
	if skipDaemon() {
		t.Skip("EMBEDD_PYTHON=skip: no daemon")
	}
	d, err := newDaemon()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon log (%s):\n%s", d.logPath, d.logTail())
		}
		d.cleanup()
	})
	if err := d.start(); err != nil {
		t.Fatalf("cannot start the embedd daemon: %v", err)
	}
	return d
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.d != nil {
		if err := shared.d.stop(); err != nil && code == 0 {
			fmt.Fprintln(os.Stderr, "shared daemon:", err)
			code = 1
		}
		shared.d.cleanup()
	}
	os.Exit(code)
}

// writeWAV writes a mono 16-bit PCM sine tone: real audio for embed_file.
func writeWAV(t *testing.T, path string, rate int, seconds float64, hz float64) []byte {
	t.Helper()
	n := int(float64(rate) * seconds)
	var b bytes.Buffer
	w := func(v any) { _ = binary.Write(&b, binary.LittleEndian, v) }
	b.WriteString("RIFF")
	w(uint32(36 + 2*n))
	b.WriteString("WAVEfmt ")
	w(uint32(16))
	w(uint16(1)) // PCM
	w(uint16(1)) // mono
	w(uint32(rate))
	w(uint32(2 * rate))
	w(uint16(2))
	w(uint16(16))
	b.WriteString("data")
	w(uint32(2 * n))
	for i := 0; i < n; i++ {
		w(int16(0.5 * 32767 * math.Sin(2*math.Pi*hz*float64(i)/float64(rate))))
	}
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// rawConn is a bare socket for sending the daemon arbitrary frames.
type rawConn struct {
	nc net.Conn
	t  *testing.T
}

func dialRaw(t *testing.T, sock string) *rawConn {
	t.Helper()
	nc, err := net.DialTimeout("unix", sock, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
	t.Cleanup(func() { nc.Close() })
	return &rawConn{nc: nc, t: t}
}

func (r *rawConn) send(msg map[string]any) {
	r.t.Helper()
	var buf bytes.Buffer
	if err := msgpack.NewEncoder(&buf).Encode(msg); err != nil {
		r.t.Fatal(err)
	}
	r.sendBytes(buf.Bytes())
}

func (r *rawConn) sendBytes(body []byte) {
	r.t.Helper()
	hdr := make([]byte, 4)
	binary.BigEndian.PutUint32(hdr, uint32(len(body)))
	if _, err := r.nc.Write(append(hdr, body...)); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rawConn) recv() (*response, error) {
	body, err := readFrame(r.nc, DefaultMaxFrame)
	if err != nil {
		return nil, err
	}
	return decodeResponse(body)
}

func (r *rawConn) closedByPeer() bool {
	_ = r.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := r.nc.Read(make([]byte, 1))
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
}
