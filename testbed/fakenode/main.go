// Command fakenode is the test platform's kubelet: it registers one Node, runs the pods scheduled to it as
// sandboxes on this host and serves exec the way a kubelet does. It exists because kwok's exec reports
// exit codes as HTTP 500 and never closes the command's stdin, and the operator depends on both.
//
// A pod's sandbox is a mount (and UTS) namespace whose root is an overlay of the pod's image directory
// over the host's root, with its volumes bound in and fresh /tmp and /run: two pods never share files
// unless they share a volume. Nothing here opens a network connection other than to the API server.
package main

import (
	"context"
	"flag"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

type config struct {
	kubeconfig string
	nodeName   string
	address    string
	port       int
	tlsCert    string
	tlsKey     string
	clientCA   string
	stateDir   string
	imageRoot  string
}

func main() {
	var cfg config
	flag.StringVar(&cfg.kubeconfig, "kubeconfig", "", "admin kubeconfig of the API server")
	flag.StringVar(&cfg.nodeName, "node-name", "testbed-node", "name of the simulated node")
	flag.StringVar(&cfg.address, "address", "127.0.0.1", "address the kubelet API listens on and the node reports")
	flag.IntVar(&cfg.port, "port", 10250, "port of the kubelet API (exec, logs)")
	flag.StringVar(&cfg.tlsCert, "tls-cert-file", "", "serving certificate of the kubelet API")
	flag.StringVar(&cfg.tlsKey, "tls-private-key-file", "", "key of the serving certificate")
	flag.StringVar(&cfg.clientCA, "client-ca-file", "", "CA that signs the API server's kubelet client certificate")
	flag.StringVar(&cfg.stateDir, "state-dir", "", "where sandboxes, volumes and container logs live")
	flag.StringVar(&cfg.imageRoot, "image-root", "", "directory of image layers: image repo/name:tag uses <image-root>/<name>")
	klog.InitFlags(nil)
	flag.Parse()
	if cfg.kubeconfig == "" || cfg.stateDir == "" || cfg.tlsCert == "" || cfg.tlsKey == "" || cfg.clientCA == "" {
		klog.Fatal("--kubeconfig, --state-dir, --tls-cert-file, --tls-private-key-file and --client-ca-file are required")
	}

	restConfig, err := clientcmd.BuildConfigFromFlags("", cfg.kubeconfig)
	if err != nil {
		klog.Fatalf("kubeconfig: %v", err)
	}
	restConfig.QPS, restConfig.Burst = 100, 200
	client := kubernetes.NewForConfigOrDie(restConfig)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	pods := newPodManager(client, cfg)
	if err := registerNode(ctx, client, cfg); err != nil {
		klog.Fatalf("registering node: %v", err)
	}
	go heartbeat(ctx, client, cfg)
	go provisionVolumes(ctx, client, cfg)
	go pods.run(ctx)
	if err := serveKubeletAPI(ctx, cfg, pods); err != nil {
		klog.Fatalf("kubelet API: %v", err)
	}
	pods.shutdown()
}
