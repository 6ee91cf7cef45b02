// Package gatewaytest runs the repo's test harness (tests/harness.py: the real gateway in front of the loopback fake
// upstream, both on loopback) for the end-to-end tests of the Go client, and drives the upstream's faults.
//
// It needs the repo's Python environment (`make setup`): the harness runs with .venv/bin/python.
package gatewaytest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// StartTimeout bounds how long the harness may take to say where its gateway serves.
const StartTimeout = 90 * time.Second

// StopTimeout bounds how long the harness may take to stop once asked, before it is killed.
const StopTimeout = 30 * time.Second

// ErrNoRepo means the tests do not run inside the llmrelay repo, so there is no gateway to start.
var ErrNoRepo = errors.New("gatewaytest: not inside the llmrelay repo (no tests/harness.py above)")

// RepoRoot finds the repo from the working directory upwards.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "tests", "harness.py")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", ErrNoRepo
		}
		dir = parent
	}
}

// Options choose the harness's gateway.
type Options struct {
	// Fallback adds a second backend after "ollama": Gateway.FallbackBackend, at the same upstream.
	Fallback bool
	// TLS makes the gateway serve TLS with a certificate for localhost and 127.0.0.1 from Gateway.CAFile.
	TLS bool
	// MutualTLS makes it serve TLS so, and ask every client for a certificate of a second CA, one of which is in
	// Gateway.ClientCertFile; Gateway.OtherClientCertFile holds one of a third CA, which it refuses.
	MutualTLS bool
	// Retries is the router's max_retries (0: none).
	Retries int
	// MaxMessageBytes is the gateway's server.max_message_bytes (0: the gateway's own default).
	MaxMessageBytes int
	// ConfigExtra is YAML appended to the gateway's configuration (the harness's --config-extra): sections the
	// harness does not write, such as auth with caller keys and their limits; never its own server, llm or router.
	ConfigExtra string
}

// Gateway is a running harness: the gateway, and the upstream behind it.
type Gateway struct {
	// Target is where the gateway serves gRPC, "127.0.0.1:PORT".
	Target string
	// Upstream is the fake upstream behind every backend of the gateway.
	Upstream *Upstream
	// FallbackBackend is the second backend's name ("" without Options.Fallback).
	FallbackBackend string
	// EmbeddingModel is the embedding model of the "ollama" backend.
	EmbeddingModel string
	// CAFile is the PEM file of the CA of the gateway's certificate ("" without Options.TLS or MutualTLS).
	CAFile string
	// ClientCertFile and ClientKeyFile are a client certificate the gateway takes, and OtherClientCertFile and
	// OtherClientKeyFile one it refuses, in PEM ("" without Options.MutualTLS).
	ClientCertFile, ClientKeyFile, OtherClientCertFile, OtherClientKeyFile string
	// PID is the gateway's process id.
	PID int

	cmd   *exec.Cmd
	stdin io.Closer
	log   *syncBuffer
	done  chan struct{}
}

// where is the line the harness prints once its gateway is SERVING.
type where struct {
	Target              string  `json:"target"`
	Upstream            string  `json:"upstream"`
	FallbackBackend     *string `json:"fallback_backend"`
	EmbeddingModel      string  `json:"embedding_model"`
	CAFile              *string `json:"ca_file"`
	ClientCertFile      *string `json:"client_cert_file"`
	ClientKeyFile       *string `json:"client_key_file"`
	OtherClientCertFile *string `json:"other_client_cert_file"`
	OtherClientKeyFile  *string `json:"other_client_key_file"`
	GatewayPID          int     `json:"gateway_pid"`
}

// Start runs the harness and waits until its gateway is SERVING.
func Start(opts Options) (*Gateway, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	venv := os.Getenv("LLMRELAY_VENV")
	if venv == "" {
		venv = filepath.Join(root, ".venv")
	}
	python := filepath.Join(venv, "bin", "python")
	if _, err := os.Stat(python); err != nil {
		return nil, fmt.Errorf("gatewaytest: %s is missing; run `make setup` at the repo root: %w", python, err)
	}
	args := []string{filepath.Join(root, "tests", "harness.py"), "--retries", strconv.Itoa(opts.Retries)}
	if opts.Fallback {
		args = append(args, "--fallback")
	}
	if opts.MutualTLS {
		args = append(args, "--mutual-tls")
	} else if opts.TLS {
		args = append(args, "--tls")
	}
	if opts.MaxMessageBytes != 0 {
		args = append(args, "--max-message-bytes", strconv.Itoa(opts.MaxMessageBytes))
	}
	if opts.ConfigExtra != "" {
		// The harness reads the file before it starts anything, so it can go once Start returns.
		path, err := writeTemp(opts.ConfigExtra)
		if err != nil {
			return nil, err
		}
		defer func() { _ = os.Remove(path) }()
		args = append(args, "--config-extra", path)
	}
	cmd := exec.Command(python, args...)
	cmd.Dir = root
	setProcAttr(cmd)
	g := &Gateway{cmd: cmd, log: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stderr = g.log
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if g.stdin, err = cmd.StdinPipe(); err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("gatewaytest: start %s: %w", cmd, err)
	}
	lines := make(chan string, 1)
	go func() {
		scanner := bufio.NewScanner(stdout)
		if scanner.Scan() {
			lines <- scanner.Text()
		}
		_, _ = io.Copy(io.Discard, stdout)
		_ = cmd.Wait()
		close(g.done)
	}()
	select {
	case line := <-lines:
		var w where
		if err := json.Unmarshal([]byte(line), &w); err != nil {
			g.Close()
			return nil, fmt.Errorf("gatewaytest: the harness printed %q, not its JSON line: %w\n%s", line, err, g.Log())
		}
		g.Target, g.Upstream, g.EmbeddingModel, g.PID = w.Target, &Upstream{URL: w.Upstream}, w.EmbeddingModel, w.GatewayPID
		g.FallbackBackend, g.CAFile = deref(w.FallbackBackend), deref(w.CAFile)
		g.ClientCertFile, g.ClientKeyFile = deref(w.ClientCertFile), deref(w.ClientKeyFile)
		g.OtherClientCertFile, g.OtherClientKeyFile = deref(w.OtherClientCertFile), deref(w.OtherClientKeyFile)
		return g, nil
	case <-g.done:
		return nil, fmt.Errorf("gatewaytest: the harness exited (%v) before its gateway served:\n%s", cmd.ProcessState,
			g.Log())
	case <-time.After(StartTimeout):
		g.Close()
		return nil, fmt.Errorf("gatewaytest: the harness's gateway did not serve within %s:\n%s", StartTimeout, g.Log())
	}
}

// writeTemp writes text to a new temporary file and returns its path.
func writeTemp(text string) (string, error) {
	f, err := os.CreateTemp("", "llmrelay-gatewaytest-*.yaml")
	if err != nil {
		return "", err
	}
	_, err = f.WriteString(text)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(f.Name())
		return "", fmt.Errorf("gatewaytest: write %s: %w", f.Name(), err)
	}
	return f.Name(), nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// Close stops the harness (the end of its stdin), killing it after StopTimeout, and returns an error that holds
// the gateway's log when the harness did not exit 0: for one, when the gateway had stopped by itself.
func (g *Gateway) Close() error {
	_ = g.stdin.Close()
	select {
	case <-g.done:
	case <-time.After(StopTimeout):
		_ = g.cmd.Process.Kill()
		<-g.done
	}
	if code := g.cmd.ProcessState.ExitCode(); code != 0 {
		return fmt.Errorf("gatewaytest: the harness exited with %d:\n%s", code, g.Log())
	}
	return nil
}

// Log is what the harness and its gateway logged so far.
func (g *Gateway) Log() string {
	return g.log.String()
}

// syncBuffer collects a process's output, for reading while it comes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Upstream is the fake upstream (tests/upstream.py) through its control API.
type Upstream struct {
	// URL is its base, "http://127.0.0.1:PORT".
	URL string
}

// Fault is one fault of the upstream: {"status": 429, "retry_after": 3}, {"stall_s": 5}, {"drop": true}, ...
type Fault map[string]any

// AddFaults queues faults: each later chat request takes the next one.
func (u *Upstream) AddFaults(faults ...Fault) error {
	body, err := json.Marshal(faults)
	if err != nil {
		return err
	}
	_, err = u.control(http.MethodPost, body)
	return err
}

// ClearFaults drops the queued faults.
func (u *Upstream) ClearFaults() error {
	_, err := u.control(http.MethodDelete, nil)
	return err
}

// Requests are the chat request bodies the upstream has received, oldest first, as it read them: decode them with
// json.Decoder.UseNumber to see each number as the upstream got it (3, not 3.0).
func (u *Upstream) Requests() ([]json.RawMessage, error) {
	body, err := u.control(http.MethodGet, nil)
	if err != nil {
		return nil, err
	}
	var requests []json.RawMessage
	if err := json.Unmarshal(body, &requests); err != nil {
		return nil, fmt.Errorf("gatewaytest: GET /_control/requests: %w", err)
	}
	return requests, nil
}

// control calls the upstream's control API: its fault queue (POST, DELETE /_control/faults) or the requests it got
// (GET /_control/requests), and returns the answer's body.
func (u *Upstream) control(method string, body []byte) ([]byte, error) {
	path := "/_control/faults"
	if method == http.MethodGet {
		path = "/_control/requests"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, u.URL+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		return nil, fmt.Errorf("gatewaytest: %s %s: HTTP %d: %s", method, path, resp.StatusCode, data)
	}
	return data, nil
}
