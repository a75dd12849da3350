package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
	"k8s.io/klog/v2"
	utilexec "k8s.io/utils/exec"
)

// serveKubeletAPI serves the two kubelet endpoints the API server proxies to: exec and container logs.
// Only clients holding a certificate from the API server's kubelet-client CA get in, as on a real node.
func serveKubeletAPI(ctx context.Context, cfg config, pods *podManager) error {
	caPEM, err := os.ReadFile(cfg.clientCA)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("no certificate in %s", cfg.clientCA)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/exec/{namespace}/{pod}/{container}", func(w http.ResponseWriter, r *http.Request) {
		serveExec(w, r, pods)
	})
	mux.HandleFunc("/containerLogs/{namespace}/{pod}/{container}", func(w http.ResponseWriter, r *http.Request) {
		serveLogs(w, r, pods)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") })
	server := &http.Server{
		Addr:              net.JoinHostPort(cfg.address, strconv.Itoa(cfg.port)),
		Handler:           mux,
		ReadHeaderTimeout: 30 * time.Second,
		TLSConfig:         &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool, MinVersion: tls.VersionTLS12},
	}
	go func() {
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = server.Shutdown(shutdownCtx)
	}()
	klog.Infof("kubelet API on https://%s", server.Addr)
	if err := server.ListenAndServeTLS(cfg.tlsCert, cfg.tlsKey); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func serveExec(w http.ResponseWriter, r *http.Request, pods *podManager) {
	ns, name, ctr := r.PathValue("namespace"), r.PathValue("pod"), r.PathValue("container")
	pod := pods.lookup(ns, name)
	if pod == nil {
		http.Error(w, fmt.Sprintf("pod %s/%s is not running on this node", ns, name), http.StatusNotFound)
		return
	}
	pod.mu.Lock()
	_, known := pod.env[ctr]
	started := pod.sandbox != nil
	pod.mu.Unlock()
	if !started {
		http.Error(w, fmt.Sprintf("pod %s/%s is still starting", ns, name), http.StatusServiceUnavailable)
		return
	}
	if !known {
		http.Error(w, fmt.Sprintf("container %s not found in pod %s/%s", ctr, ns, name), http.StatusNotFound)
		return
	}
	opts, err := remotecommand.NewOptions(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	remotecommand.ServeExec(w, r, &executor{pod: pod}, name, string(pod.uid), ctr, r.URL.Query()["command"],
		opts, 4*time.Hour, 30*time.Second, remotecommand.SupportedStreamingProtocols)
}

type executor struct{ pod *runningPod }

// ExecInContainer runs the command in the pod's sandbox. Two details matter to the operator and are why
// this server exists: the end of the client's stdin reaches the command as EOF, and a non-zero exit
// status is returned as an exit code the client sees, not as a server error.
func (e *executor) ExecInContainer(_ context.Context, _ string, _ string, container string, cmd []string,
	in io.Reader, out, errOut io.WriteCloser, tty bool, _ <-chan remotecommand.TerminalSize, _ time.Duration) error {
	if tty {
		return errors.New("tty exec is not supported by the test node")
	}
	e.pod.mu.Lock()
	if e.pod.stopping {
		e.pod.mu.Unlock()
		return errors.New("pod is terminating")
	}
	proc := e.pod.sandbox.command(e.pod.env[container], cmd)
	e.pod.mu.Unlock()
	// Like a container runtime's shim, keep draining output after the client went away: the process
	// runs to its end instead of blocking on a full pipe.
	if out != nil {
		proc.Stdout = &drainingWriter{w: out}
	}
	if errOut != nil {
		proc.Stderr = &drainingWriter{w: errOut}
	}
	var stdinDone sync.WaitGroup
	if in != nil {
		stdin, err := proc.StdinPipe()
		if err != nil {
			return err
		}
		stdinDone.Add(1)
		go func() {
			defer stdinDone.Done()
			_, _ = io.Copy(stdin, in)
			_ = stdin.Close()
		}()
	}
	if err := proc.Start(); err != nil {
		return err
	}
	err := proc.Wait()
	var exitErr interface{ ExitCode() int }
	if errors.As(err, &exitErr) && exitErr.ExitCode() >= 0 {
		return utilexec.CodeExitError{Err: err, Code: exitErr.ExitCode()}
	}
	return err
}

type drainingWriter struct {
	w      io.Writer
	failed bool
}

func (d *drainingWriter) Write(p []byte) (int, error) {
	if !d.failed {
		if _, err := d.w.Write(p); err != nil {
			d.failed = true
		}
	}
	return len(p), nil
}

func serveLogs(w http.ResponseWriter, r *http.Request, pods *podManager) {
	pod := pods.lookup(r.PathValue("namespace"), r.PathValue("pod"))
	if pod == nil {
		http.Error(w, "pod is not running on this node", http.StatusNotFound)
		return
	}
	pod.mu.Lock()
	sb := pod.sandbox
	pod.mu.Unlock()
	if sb == nil {
		http.Error(w, "pod is still starting", http.StatusServiceUnavailable)
		return
	}
	f, err := os.Open(filepath.Join(sb.dir, filepath.Base(r.PathValue("container"))+".log"))
	if err != nil {
		http.Error(w, "no log for this container", http.StatusNotFound)
		return
	}
	defer f.Close()
	_, _ = io.Copy(w, f)
}
