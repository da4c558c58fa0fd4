package procdeploy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Homeserver is one Synapse process of a deployment.
type Homeserver struct {
	Name    string // "hs1", also the Matrix server name
	IP      string // its own loopback address
	Dir     string // data directory: config, keys, database, media
	LogPath string // Synapse's log (kept after the run)

	consolePath string // the process's stdout/stderr
	configPath  string
	seed        string // makes secrets unique per homeserver and run

	m  *Manager
	db map[string]any
	pg string // PostgreSQL database name, "" for SQLite

	mu      sync.Mutex
	proc    *os.Process
	done    chan struct{} // closed when the process has exited
	exitErr error
	paused  bool
}

// BaseURL is the client-server API URL Complement's clients use.
func (hs *Homeserver) BaseURL() string { return fmt.Sprintf("http://%s:%d", hs.IP, clientPort) }

// FedBaseURL is where the federation listener is.
func (hs *Homeserver) FedBaseURL() string { return fmt.Sprintf("https://%s:%d", hs.IP, federationPort) }

func (hs *Homeserver) secret(purpose string) string {
	sum := sha256.Sum256([]byte(hs.seed + "/" + purpose))
	return hex.EncodeToString(sum[:])
}

// PID is the process ID while the homeserver runs, else 0.
func (hs *Homeserver) PID() int {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	if hs.proc == nil {
		return 0
	}
	return hs.proc.Pid
}

// prepare writes everything the homeserver needs before its first start.
func (hs *Homeserver) prepare() error {
	s := &hs.m.settings
	if err := os.MkdirAll(filepath.Join(hs.Dir, "media_store"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(hs.Dir, "complement-ca.crt"), hs.m.ca.certPEM, 0o644); err != nil {
		return err
	}
	if err := hs.m.ca.issue(hs.Name, net.ParseIP(hs.IP), filepath.Join(hs.Dir, "tls.crt"), filepath.Join(hs.Dir, "tls.key")); err != nil {
		return fmt.Errorf("TLS certificate: %w", err)
	}
	if err := writeSigningKey(filepath.Join(hs.Dir, "signing.key")); err != nil {
		return fmt.Errorf("signing key: %w", err)
	}
	if s.Database == "postgres" {
		// One fresh database per homeserver, with the C locale Synapse requires.
		hs.pg = fmt.Sprintf("complement_%s_%s", strings.ReplaceAll(hs.m.runID, "-", "_"), hs.secret("db")[:10])
		hs.pg = strings.ToLower(hs.pg) + "_" + hs.Name
		sql := fmt.Sprintf(`CREATE DATABASE "%s" ENCODING 'UTF8' LC_COLLATE='C' LC_CTYPE='C' TEMPLATE=template0`, hs.pg)
		if err := pgAdminSQL(s.Python, s.PostgresDSN, sql); err != nil {
			return fmt.Errorf("creating PostgreSQL database %s: %w", hs.pg, err)
		}
		args, err := pgParams(s.PostgresDSN, hs.pg)
		if err != nil {
			return err
		}
		hs.db = map[string]any{"name": "psycopg2", "args": args}
	} else {
		hs.db = map[string]any{"name": "sqlite3", "args": map[string]any{"database": filepath.Join(hs.Dir, "homeserver.db")}}
	}
	cfg := homeserverConfig(hs, s, hs.db)
	if hs.m.extraConfig != nil {
		cfg = mergeConfig(cfg, hs.m.extraConfig)
	}
	if err := writeJSON(hs.configPath, cfg); err != nil {
		return err
	}
	return writeJSON(filepath.Join(hs.Dir, "log.yaml"), logConfig(hs))
}

// Start launches the process in its own mount namespace (private /etc/hosts
// and /etc/resolv.conf) and waits until /health answers 200.
func (hs *Homeserver) Start(hostsFile string) error {
	hs.mu.Lock()
	if hs.proc != nil {
		hs.mu.Unlock()
		return fmt.Errorf("%s is already running (pid %d)", hs.Name, hs.proc.Pid)
	}
	hs.mu.Unlock()

	console, err := os.OpenFile(hs.consolePath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer console.Close()
	fmt.Fprintf(console, "==== %s starting %s at %s\n", hs.Name, hs.m.settings.Python, time.Now().Format(time.RFC3339Nano))
	logOffset := fileSize(hs.LogPath)

	args := hs.m.namespaceCommand(hostsFile, []string{hs.m.settings.Python, "-m", "synapse.app.homeserver", "-c", hs.configPath})
	env := cleanEnv()
	proc, err := hs.m.spawn(args, hs.Dir, env, console)
	if err != nil {
		return fmt.Errorf("starting %s: %w", hs.Name, err)
	}
	done := make(chan struct{})
	hs.mu.Lock()
	hs.proc, hs.done, hs.paused, hs.exitErr = proc, done, false, nil
	hs.mu.Unlock()
	go func() {
		st, werr := proc.Wait()
		hs.mu.Lock()
		if werr != nil {
			hs.exitErr = werr
		} else if !st.Success() {
			hs.exitErr = errors.New(st.String())
		}
		hs.mu.Unlock()
		close(done)
	}()

	if err := hs.waitHealthy(done, hs.m.settings.SpawnTimeout); err != nil {
		_ = hs.Stop(5 * time.Second)
		return fmt.Errorf("%s did not become healthy: %w\n--- console (%s):\n%s\n--- log (%s):\n%s",
			hs.Name, err, hs.consolePath, tailFile(hs.consolePath, 0, 30), hs.LogPath, tailFile(hs.LogPath, logOffset, 40))
	}
	return nil
}

func (hs *Homeserver) waitHealthy(done <-chan struct{}, timeout time.Duration) error {
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(timeout)
	url := hs.BaseURL() + "/health"
	for {
		select {
		case <-done:
			hs.mu.Lock()
			e := hs.exitErr
			hs.mu.Unlock()
			return fmt.Errorf("process exited (%v)", e)
		default:
		}
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no 200 from %s within %s (last error: %v)", url, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stop ends the process: SIGTERM, then SIGKILL after `grace`.
func (hs *Homeserver) Stop(grace time.Duration) error {
	hs.mu.Lock()
	proc, done, paused := hs.proc, hs.done, hs.paused
	hs.mu.Unlock()
	if proc == nil {
		return nil
	}
	pgid := -proc.Pid
	if paused {
		_ = syscall.Kill(pgid, syscall.SIGCONT)
	}
	_ = syscall.Kill(pgid, syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(grace):
		_ = syscall.Kill(pgid, syscall.SIGKILL)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			return fmt.Errorf("%s (pid %d) did not exit after SIGKILL", hs.Name, proc.Pid)
		}
	}
	hs.mu.Lock()
	hs.proc, hs.paused = nil, false
	hs.mu.Unlock()
	return nil
}

// Pause freezes the process (SIGSTOP), as `docker pause` does a container.
func (hs *Homeserver) Pause() error { return hs.signal(syscall.SIGSTOP, true) }

// Unpause resumes it (SIGCONT).
func (hs *Homeserver) Unpause() error { return hs.signal(syscall.SIGCONT, false) }

func (hs *Homeserver) signal(sig syscall.Signal, paused bool) error {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	if hs.proc == nil {
		return fmt.Errorf("%s is not running", hs.Name)
	}
	if err := syscall.Kill(-hs.proc.Pid, sig); err != nil {
		return err
	}
	hs.paused = paused
	return nil
}

// removeData deletes the data directory (logs live outside it) and the
// PostgreSQL database, if any.
func (hs *Homeserver) removeData() {
	_ = os.RemoveAll(hs.Dir)
	if hs.pg != "" {
		_ = pgAdminSQL(hs.m.settings.Python, hs.m.settings.PostgresDSN, fmt.Sprintf(`DROP DATABASE IF EXISTS "%s"`, hs.pg))
	}
}

// cleanEnv is our environment minus what could make a stock server import
// code from the checkout.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k := kv[:strings.IndexByte(kv, '=')+1]
		switch k {
		case "PYTHONPATH=", "PYTHONHOME=", "PYTHONSTARTUP=", "PYTHONSAFEPATH=":
			continue
		}
		env = append(env, kv)
	}
	return append(env, "PYTHONUNBUFFERED=1", "SYNAPSE_ASYNC_IO_REACTOR=0")
}

// spawnRequest asks the spawner goroutine to start a process.
type spawnRequest struct {
	args    []string
	dir     string
	env     []string
	console *os.File
	reply   chan spawnReply
}

type spawnReply struct {
	proc *os.Process
	err  error
}

// spawner starts every homeserver from one OS thread that never exits, so the
// children's parent-death signal (SIGKILL) fires only when this test process
// dies: no homeserver outlives a crashed or killed test binary.
func (m *Manager) spawner() {
	runtime.LockOSThread()
	for req := range m.spawnCh {
		cmd := exec.Command(req.args[0], req.args[1:]...)
		cmd.Dir, cmd.Env = req.dir, req.env
		cmd.Stdout, cmd.Stderr = req.console, req.console
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		err := cmd.Start()
		req.reply <- spawnReply{proc: cmd.Process, err: err}
	}
}

func (m *Manager) spawn(args []string, dir string, env []string, console *os.File) (*os.Process, error) {
	reply := make(chan spawnReply, 1)
	m.spawnCh <- spawnRequest{args: args, dir: dir, env: env, console: console, reply: reply}
	r := <-reply
	return r.proc, r.err
}

// namespaceCommand wraps a command so it runs in a new mount namespace where
// /etc/hosts and /etc/resolv.conf are the deployment's own files. Mounts made
// there vanish with the process. Root is needed (or, for non-root users,
// unprivileged user namespaces, which are tried instead).
func (m *Manager) namespaceCommand(hostsFile string, cmd []string) []string {
	script := `mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"`
	args := []string{"unshare", "--mount", "--propagation", "private"}
	if os.Geteuid() != 0 {
		args = append(args, "--user", "--map-root-user")
	}
	args = append(args, "--", "/bin/sh", "-c", script, "procdeploy", hostsFile, m.resolvPath)
	return append(args, cmd...)
}

func runQuiet(name string, args ...string) error {
	var out bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.Env = cleanEnv()
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		return err
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("%w: %s", err, strings.TrimSpace(out.String()))
		}
		return nil
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("%s timed out after 60s", name)
	}
}

func fileSize(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return st.Size()
}

// tailFile returns the last `lines` lines of path after byte `from`.
func tailFile(path string, from int64, lines int) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(cannot read: %v)", err)
	}
	defer f.Close()
	const maxBytes = 256 << 10
	size := fileSize(path)
	start := from
	if size-start > maxBytes {
		start = size - maxBytes
	}
	if _, err := f.Seek(start, 0); err != nil {
		return ""
	}
	buf := make([]byte, size-start)
	n, _ := f.Read(buf)
	all := strings.Split(strings.TrimRight(string(buf[:n]), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}
