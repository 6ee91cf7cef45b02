// Package gatewaytest runs the real llmrelay gateway in front of the repo's fake OpenAI upstream
// (tests/upstream.py), both as subprocesses on loopback, for the end-to-end tests of the Go client.
//
// It needs the repo's Python environment (`make setup`): the gateway is .venv/bin/llmrelay-server.
package gatewaytest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// StartTimeout bounds how long a subprocess may take to say it is listening.
const StartTimeout = 60 * time.Second

// ErrNoRepo means the tests do not run inside the llmrelay repo, so there is no gateway to start.
var ErrNoRepo = errors.New("gatewaytest: not inside the llmrelay repo (no proto/llmrelay/v1/llmrelay.proto above)")

// RepoRoot finds the repo from the working directory upwards.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "proto", "llmrelay", "v1", "llmrelay.proto")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", ErrNoRepo
		}
		dir = parent
	}
}

// venvBin is a program of the repo's Python environment; LLMRELAY_VENV overrides where that is.
func venvBin(root, name string) (string, error) {
	venv := os.Getenv("LLMRELAY_VENV")
	if venv == "" {
		venv = filepath.Join(root, ".venv")
	}
	path := filepath.Join(venv, "bin", name)
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("gatewaytest: %s is missing; run `make setup` at the repo root: %w", path, err)
	}
	return path, nil
}

// process is a subprocess whose output is kept, for the error messages of failed tests.
type process struct {
	name string
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error // the result of Wait, once done is closed
}

// syncBuffer collects output lines, for reading while they come.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// scan collects r's lines, and sends the first group of the first line matching match to ready.
func (b *syncBuffer) scan(r io.Reader, match *regexp.Regexp, ready chan<- string) {
	scanner := bufio.NewScanner(r)
	for scanner.Scan() {
		line := scanner.Text()
		b.mu.Lock()
		b.buf.WriteString(line + "\n")
		b.mu.Unlock()
		if m := match.FindStringSubmatch(line); m != nil && ready != nil {
			ready <- m[1]
			ready = nil
		}
	}
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// start runs the command and waits for the line matching ready on its output; it returns the first group.
func start(name string, cmd *exec.Cmd, ready *regexp.Regexp, stdout bool) (*process, string, error) {
	out := &syncBuffer{}
	var pipe io.ReadCloser
	var err error
	if stdout {
		pipe, err = cmd.StdoutPipe()
		cmd.Stderr = os.Stderr
	} else {
		pipe, err = cmd.StderrPipe()
	}
	if err != nil {
		return nil, "", err
	}
	setProcAttr(cmd)
	if err := cmd.Start(); err != nil {
		return nil, "", fmt.Errorf("gatewaytest: start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, out: out, done: make(chan struct{})}
	readReady := make(chan string, 1)
	go func() {
		out.scan(pipe, ready, readReady)
		p.err = cmd.Wait()
		close(p.done)
	}()
	select {
	case value := <-readReady:
		return p, value, nil
	case <-p.done:
		return nil, "", fmt.Errorf("gatewaytest: %s exited before it was ready (%v):\n%s", name, p.err, out)
	case <-time.After(StartTimeout):
		_ = cmd.Process.Kill()
		<-p.done
		return nil, "", fmt.Errorf("gatewaytest: %s was not ready within %s:\n%s", name, StartTimeout, out)
	}
}

// stop sends SIGTERM (a no-op once it has exited) and waits up to timeout, then kills. It returns the exit code (-1
// when killed).
func (p *process) stop(timeout time.Duration) int {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(timeout):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	return p.cmd.ProcessState.ExitCode()
}

// Upstream is the fake OpenAI-compatible server (tests/upstream.py), also serving Ollama's probe endpoints.
type Upstream struct {
	// URL is its base, "http://127.0.0.1:PORT".
	URL  string
	proc *process
}

// StartUpstream starts the fake upstream on a free loopback port.
func StartUpstream() (*Upstream, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	python, err := venvBin(root, "python")
	if err != nil {
		return nil, err
	}
	// --ollama: the gateway's "ollama" backend probes /api/version, which only then answers.
	cmd := exec.Command(python, filepath.Join(root, "tests", "upstream.py"), "--listen", "127.0.0.1:0", "--ollama")
	proc, url, err := start("upstream", cmd, regexp.MustCompile(`upstream listening on (http://\S+)`), true)
	if err != nil {
		return nil, err
	}
	return &Upstream{URL: url, proc: proc}, nil
}

// Close stops the upstream.
func (u *Upstream) Close() {
	u.proc.stop(5 * time.Second)
}

// Fault is one fault of the upstream: {"status": 429, "retry_after": 3}, {"stall_s": 5}, {"drop": true}, ...
type Fault map[string]any

// AddFaults queues faults: each later chat request takes the next one.
func (u *Upstream) AddFaults(faults ...Fault) error {
	body, err := json.Marshal(faults)
	if err != nil {
		return err
	}
	return u.faults(http.MethodPost, body)
}

// ClearFaults drops the queued faults.
func (u *Upstream) ClearFaults() error {
	return u.faults(http.MethodDelete, nil)
}

// Requests are the chat request bodies the upstream has received, oldest first, as it read them: decode them with
// json.Decoder.UseNumber to see each number as the upstream got it (3, not 3.0).
func (u *Upstream) Requests() ([]json.RawMessage, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.URL+"/_control/requests", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var requests []json.RawMessage
	if err := json.NewDecoder(resp.Body).Decode(&requests); err != nil {
		return nil, fmt.Errorf("gatewaytest: GET /_control/requests: %w", err)
	}
	return requests, nil
}

// faults calls the upstream's fault queue, /_control/faults.
func (u *Upstream) faults(method string, body []byte) error {
	const path = "/_control/faults"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, u.URL+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("gatewaytest: %s %s: HTTP %d: %s", method, path, resp.StatusCode, data)
	}
	return nil
}

// Gateway is the real gateway (.venv/bin/llmrelay-server) with one "ollama" backend, and with StartGatewayWithFallback
// a second one, FallbackBackend.
type Gateway struct {
	// Addr is where it serves gRPC, "127.0.0.1:PORT".
	Addr string
	proc *process
	dir  string // its config and usage ledger, removed by Stop
}

// FallbackBackend is the name of the second backend of a gateway started by StartGatewayWithFallback.
const FallbackBackend = "fallback"

// EmbeddingModel is the embedding model of the gateway's "ollama" backend (the fake upstream's).
const EmbeddingModel = "embed-test"

// StartGateway starts the gateway on a free loopback port, with one backend at baseURL (".../v1"), no retries.
func StartGateway(baseURL string) (*Gateway, error) {
	return startGateway(fmt.Sprintf("llm:\n  ollama: {base_url: %q, model: \"tiny\", embedding_model: %q}\n"+
		"router: {retry: {max_retries: 0}}\n", baseURL, EmbeddingModel))
}

// StartGatewayWithFallback starts the gateway like StartGateway, with a second backend after "ollama" in the routing
// order: FallbackBackend, of kind openai_compatible, at fallbackURL (".../v1"; the same upstream as baseURL will do,
// since each chat request takes the next queued fault whichever backend sends it).
func StartGatewayWithFallback(baseURL, fallbackURL string) (*Gateway, error) {
	return startGateway(fmt.Sprintf("llm:\n  ollama: {base_url: %q, model: \"tiny\"}\n"+
		"  backends:\n    - {name: %s, kind: openai_compatible, base_url: %q, model: \"tiny\"}\n"+
		"router: {retry: {max_retries: 0}}\n", baseURL, FallbackBackend, fallbackURL))
}

// startGateway starts the gateway on a free loopback port with the YAML config.
func startGateway(yaml string) (*Gateway, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	server, err := venvBin(root, "llmrelay-server")
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "llmrelay-gateway-")
	if err != nil {
		return nil, err
	}
	config := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(config, []byte(yaml), 0o600); err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	cmd := exec.Command(server, "--listen", "127.0.0.1:0", "--config", config)
	cmd.Dir = dir
	cmd.Env = gatewayEnv()
	proc, addr, err := start("gateway", cmd, regexp.MustCompile(`listening on (127\.0\.0\.1:\d+)`), false)
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	g := &Gateway{Addr: addr, proc: proc, dir: dir}
	if err := g.waitServing(); err != nil {
		g.Stop(5 * time.Second)
		return nil, err
	}
	return g, nil
}

// waitServing waits until grpc.health.v1 says SERVING: the gateway answers calls, and handles SIGTERM.
func (g *Gateway) waitServing() error {
	conn, err := grpc.NewClient(g.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)
	deadline := time.Now().Add(StartTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("gatewaytest: the gateway at %s is not SERVING (%v, %v):\n%s", g.Addr, resp, err, g.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// gatewayEnv is this process's environment with only the test config deciding the backends.
func gatewayEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "OLLAMA_HOST=") || strings.HasPrefix(kv, "OPENAI_API_KEY=") ||
			strings.HasPrefix(kv, "LLMRELAY_") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "OPENAI_API_KEY=")
}

// Stop sends SIGTERM, waits for the gateway to exit (killing it after timeout), removes its directory, and returns
// its exit code.
func (g *Gateway) Stop(timeout time.Duration) int {
	code := g.proc.stop(timeout)
	_ = os.RemoveAll(g.dir)
	return code
}

// Log is what the gateway logged so far.
func (g *Gateway) Log() string {
	return g.proc.out.String()
}

// Env is an upstream with a gateway in front of it.
type Env struct {
	Upstream *Upstream
	Gateway  *Gateway
}

// Start starts an upstream and a gateway in front of it.
func Start() (*Env, error) {
	upstream, err := StartUpstream()
	if err != nil {
		return nil, err
	}
	gateway, err := StartGateway(upstream.URL + "/v1")
	if err != nil {
		upstream.Close()
		return nil, err
	}
	return &Env{Upstream: upstream, Gateway: gateway}, nil
}

// Close stops both.
func (e *Env) Close() {
	e.Gateway.Stop(15 * time.Second)
	e.Upstream.Close()
}

// DeadAddr is a loopback address where nothing listens (a port that was free a moment ago).
func DeadAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := l.Addr().String()
	return addr, l.Close()
}
