package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// runningPod is what this node knows of a pod it runs.
type runningPod struct {
	mu         sync.Mutex
	namespace  string
	name       string
	uid        types.UID
	sandbox    *sandbox
	env        map[string][]string // per container
	containers map[string]*container
	started    metav1.Time
	stopping   bool
}

type container struct {
	name     string
	ready    bool
	running  bool
	exitCode int32
	restarts int32
	started  metav1.Time
}

type podManager struct {
	client kubernetes.Interface
	cfg    config
	mu     sync.Mutex
	pods   map[types.UID]*runningPod
}

func newPodManager(client kubernetes.Interface, cfg config) *podManager {
	return &podManager{client: client, cfg: cfg, pods: map[types.UID]*runningPod{}}
}

func (m *podManager) podsDir() string { return filepath.Join(m.cfg.stateDir, "pods") }

func (m *podManager) run(ctx context.Context) {
	reapStaleSandboxes(m.podsDir())
	factory := informers.NewSharedInformerFactoryWithOptions(m.client, 30*time.Second,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", m.cfg.nodeName).String()
		}))
	informer := factory.Core().V1().Pods().Informer()
	// Each pod is handled on its own goroutine: starting a sandbox or waiting out a grace period must not
	// hold up the other pods.
	handle := func(obj any) {
		if pod, ok := obj.(*corev1.Pod); ok {
			go m.sync(ctx, pod)
		}
	}
	_, _ = informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: handle, UpdateFunc: func(_, obj any) { handle(obj) }})
	factory.Start(ctx.Done())
	<-ctx.Done()
}

func (m *podManager) shutdown() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, p := range m.pods {
		p.mu.Lock()
		p.stopping = true
		p.sandbox.stop(time.Second)
		p.mu.Unlock()
	}
}

func (m *podManager) lookup(namespace, name string) *runningPod {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, p := range m.pods {
		if p.namespace == namespace && p.name == name {
			return p
		}
	}
	return nil
}

func (m *podManager) sync(ctx context.Context, pod *corev1.Pod) {
	m.mu.Lock()
	p, known := m.pods[pod.UID]
	if !known && pod.DeletionTimestamp == nil && pod.Status.Phase != corev1.PodSucceeded &&
		pod.Status.Phase != corev1.PodFailed {
		p = &runningPod{namespace: pod.Namespace, name: pod.Name, uid: pod.UID}
		m.pods[pod.UID] = p
	}
	m.mu.Unlock()
	if p == nil {
		if pod.DeletionTimestamp != nil {
			m.forget(ctx, pod)
		}
		return
	}
	if m.advance(ctx, p, pod) {
		m.reportStatus(ctx, p, pod)
	}
}

// advance moves the pod one step towards what its object asks for, and says whether it started.
func (m *podManager) advance(ctx context.Context, p *runningPod, pod *corev1.Pod) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pod.DeletionTimestamp != nil {
		if !p.stopping {
			p.stopping = true
			grace := time.Duration(ptr.Deref(pod.DeletionGracePeriodSeconds, 0)) * time.Second
			if p.sandbox != nil {
				p.sandbox.stop(min(grace, 5*time.Second))
			}
			m.mu.Lock()
			delete(m.pods, pod.UID)
			m.mu.Unlock()
			m.forget(ctx, pod)
		}
		return false
	}
	if p.sandbox != nil || p.stopping {
		return false
	}
	if err := m.start(ctx, p, pod); err != nil {
		klog.Errorf("starting pod %s/%s: %v", pod.Namespace, pod.Name, err)
		m.warn(ctx, pod, "FailedCreatePodSandBox", err.Error())
		m.mu.Lock()
		delete(m.pods, pod.UID) // retried at the next resync
		m.mu.Unlock()
		return false
	}
	return true
}

// forget completes a deletion the way the kubelet does: with a zero grace period once nothing runs.
func (m *podManager) forget(ctx context.Context, pod *corev1.Pod) {
	err := m.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr.To[int64](0), Preconditions: &metav1.Preconditions{UID: &pod.UID}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		klog.Errorf("deleting pod %s/%s: %v", pod.Namespace, pod.Name, err)
	}
}

func (m *podManager) start(ctx context.Context, p *runningPod, pod *corev1.Pod) error {
	mounts, err := m.resolveMounts(ctx, pod)
	if err != nil {
		return err
	}
	p.env = map[string][]string{}
	for _, c := range pod.Spec.Containers {
		env, err := m.resolveEnv(ctx, pod, c)
		if err != nil {
			return err
		}
		p.env[c.Name] = env
	}
	image := ""
	if len(pod.Spec.Containers) > 0 {
		image = m.imageDir(pod.Spec.Containers[0].Image)
	}
	sb, err := startSandbox(filepath.Join(m.podsDir(), string(pod.UID)), image, podHostname(pod), mounts)
	if err != nil {
		return err
	}
	p.sandbox, p.started = sb, metav1.Now()
	p.containers = map[string]*container{}
	for _, c := range pod.Spec.Containers {
		ctr := &container{name: c.Name, started: metav1.Now(), running: true, ready: c.ReadinessProbe == nil}
		p.containers[c.Name] = ctr
		if len(c.Command)+len(c.Args) > 0 {
			go m.supervise(ctx, p, pod, c, ctr)
		}
		if c.ReadinessProbe != nil && c.ReadinessProbe.Exec != nil {
			go m.probe(ctx, p, pod, c, ctr)
		}
	}
	return nil
}

// imageDir maps an image reference to a directory of files layered over the host's root;
// "registry/freeipa-standin:tag" uses <image-root>/freeipa-standin. Unknown images add nothing.
func (m *podManager) imageDir(image string) string {
	if m.cfg.imageRoot == "" {
		return ""
	}
	name := image[strings.LastIndex(image, "/")+1:]
	if i := strings.IndexAny(name, ":@"); i >= 0 {
		name = name[:i]
	}
	dir := filepath.Join(m.cfg.imageRoot, name)
	if st, err := os.Stat(dir); err == nil && st.IsDir() {
		return dir
	}
	return ""
}

func podHostname(pod *corev1.Pod) string {
	host := pod.Spec.Hostname
	if host == "" {
		host = pod.Name
	}
	if pod.Spec.Subdomain != "" && ptr.Deref(pod.Spec.SetHostnameAsFQDN, false) {
		host = fmt.Sprintf("%s.%s.%s.svc.cluster.local", host, pod.Spec.Subdomain, pod.Namespace)
	}
	return host
}

func (m *podManager) resolveMounts(ctx context.Context, pod *corev1.Pod) ([]bindMount, error) {
	sources := map[string]string{}
	for _, v := range pod.Spec.Volumes {
		switch {
		case v.PersistentVolumeClaim != nil:
			pvc, err := m.client.CoreV1().PersistentVolumeClaims(pod.Namespace).Get(ctx, v.PersistentVolumeClaim.ClaimName, metav1.GetOptions{})
			if err != nil {
				return nil, err
			}
			if pvc.Spec.VolumeName == "" {
				return nil, fmt.Errorf("claim %s is not bound yet", pvc.Name)
			}
			pv, err := m.client.CoreV1().PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
			if err != nil {
				return nil, err
			}
			if pv.Spec.HostPath == nil {
				return nil, fmt.Errorf("volume %s is not a hostPath volume", pv.Name)
			}
			sources[v.Name] = pv.Spec.HostPath.Path
		case v.EmptyDir != nil:
			dir := filepath.Join(m.podsDir(), string(pod.UID), "volumes", v.Name)
			if err := os.MkdirAll(dir, 0o777); err != nil {
				return nil, err
			}
			sources[v.Name] = dir
		case v.HostPath != nil:
			sources[v.Name] = v.HostPath.Path
		}
	}
	var mounts []bindMount
	for _, c := range pod.Spec.Containers {
		for _, vm := range c.VolumeMounts {
			if src, ok := sources[vm.Name]; ok {
				mounts = append(mounts, bindMount{source: filepath.Join(src, vm.SubPath), target: vm.MountPath, readOnly: vm.ReadOnly})
			}
		}
	}
	return mounts, nil
}

// resolveEnv gives a container's processes the environment a kubelet would: literal values, values from
// Secrets and ConfigMaps, and the pod fields tests rely on.
func (m *podManager) resolveEnv(ctx context.Context, pod *corev1.Pod, c corev1.Container) ([]string, error) {
	env := []string{"PATH=" + defaultPath, "HOSTNAME=" + podHostname(pod), "HOME=/root"}
	for _, e := range c.Env {
		value := e.Value
		if src := e.ValueFrom; src != nil {
			var err error
			switch {
			case src.SecretKeyRef != nil:
				var s *corev1.Secret
				if s, err = m.client.CoreV1().Secrets(pod.Namespace).Get(ctx, src.SecretKeyRef.Name, metav1.GetOptions{}); err == nil {
					value = string(s.Data[src.SecretKeyRef.Key])
				}
			case src.ConfigMapKeyRef != nil:
				var cm *corev1.ConfigMap
				if cm, err = m.client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, src.ConfigMapKeyRef.Name, metav1.GetOptions{}); err == nil {
					value = cm.Data[src.ConfigMapKeyRef.Key]
				}
			case src.FieldRef != nil:
				value = map[string]string{"metadata.name": pod.Name, "metadata.namespace": pod.Namespace,
					"spec.nodeName": pod.Spec.NodeName, "status.podIP": m.cfg.address}[src.FieldRef.FieldPath]
			}
			if err != nil {
				return nil, fmt.Errorf("env %s: %w", e.Name, err)
			}
		}
		env = append(env, e.Name+"="+value)
	}
	return env, nil
}

// supervise runs a container's main process and restarts it, as restartPolicy Always does.
func (m *podManager) supervise(ctx context.Context, p *runningPod, pod *corev1.Pod, c corev1.Container, ctr *container) {
	logPath := filepath.Join(p.sandbox.dir, c.Name+".log")
	for {
		logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			klog.Errorf("container log %s: %v", logPath, err)
			return
		}
		cmd := p.sandbox.command(p.env[c.Name], append(append([]string{}, c.Command...), c.Args...))
		cmd.Stdout, cmd.Stderr = logFile, logFile
		err = cmd.Run()
		logFile.Close()
		p.mu.Lock()
		if p.stopping {
			p.mu.Unlock()
			return
		}
		ctr.running, ctr.ready = false, false
		ctr.exitCode = int32(cmd.ProcessState.ExitCode())
		ctr.restarts++
		p.mu.Unlock()
		klog.Infof("container %s of %s/%s exited: %v", c.Name, pod.Namespace, pod.Name, err)
		m.reportStatus(ctx, p, pod)
		if pod.Spec.RestartPolicy == corev1.RestartPolicyNever {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
		p.mu.Lock()
		ctr.running, ctr.started = true, metav1.Now()
		ctr.ready = c.ReadinessProbe == nil
		p.mu.Unlock()
		m.reportStatus(ctx, p, pod)
	}
}

// probe runs an exec readiness probe in the sandbox; only a zero exit status counts as ready.
func (m *podManager) probe(ctx context.Context, p *runningPod, pod *corev1.Pod, c corev1.Container, ctr *container) {
	rp := c.ReadinessProbe
	period := time.Duration(max(rp.PeriodSeconds, 1)) * time.Second
	timeout := time.Duration(max(rp.TimeoutSeconds, 1)) * time.Second
	select {
	case <-ctx.Done():
		return
	case <-time.After(time.Duration(rp.InitialDelaySeconds) * time.Second):
	}
	for {
		p.mu.Lock()
		if p.stopping {
			p.mu.Unlock()
			return
		}
		cmd := p.sandbox.command(p.env[c.Name], rp.Exec.Command)
		p.mu.Unlock()
		ready := false
		if err := cmd.Start(); err == nil {
			timer := time.AfterFunc(timeout, func() { _ = cmd.Process.Kill() })
			ready = cmd.Wait() == nil
			timer.Stop()
		}
		p.mu.Lock()
		changed := ctr.ready != (ready && ctr.running)
		ctr.ready = ready && ctr.running
		p.mu.Unlock()
		if changed {
			m.reportStatus(ctx, p, pod)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(period):
		}
	}
}

func condition(t corev1.PodConditionType, ok bool, now metav1.Time) corev1.PodCondition {
	status := corev1.ConditionFalse
	if ok {
		status = corev1.ConditionTrue
	}
	return corev1.PodCondition{Type: t, Status: status, LastTransitionTime: now}
}

// reportStatus publishes the pod's phase, conditions and container states.
func (m *podManager) reportStatus(ctx context.Context, p *runningPod, pod *corev1.Pod) {
	p.mu.Lock()
	allReady := true
	var statuses []corev1.ContainerStatus
	for _, c := range pod.Spec.Containers {
		ctr := p.containers[c.Name]
		st := corev1.ContainerStatus{Name: c.Name, Image: c.Image, ImageID: "testbed://" + c.Image,
			ContainerID: fmt.Sprintf("testbed://%s/%s", p.uid, c.Name), Ready: ctr.ready,
			Started: ptr.To(ctr.running), RestartCount: ctr.restarts}
		if ctr.running {
			st.State.Running = &corev1.ContainerStateRunning{StartedAt: ctr.started}
		} else {
			st.State.Terminated = &corev1.ContainerStateTerminated{ExitCode: ctr.exitCode,
				Reason: "Error", FinishedAt: metav1.Now()}
		}
		allReady = allReady && ctr.ready
		statuses = append(statuses, st)
	}
	started := p.started
	p.mu.Unlock()

	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		current, err := m.client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if current.UID != p.uid {
			return nil
		}
		now := metav1.Now()
		current.Status.Phase = corev1.PodRunning
		current.Status.HostIP, current.Status.PodIP = m.cfg.address, m.cfg.address
		current.Status.HostIPs = []corev1.HostIP{{IP: m.cfg.address}}
		current.Status.PodIPs = []corev1.PodIP{{IP: m.cfg.address}}
		current.Status.StartTime = &started
		current.Status.ContainerStatuses = statuses
		current.Status.Conditions = []corev1.PodCondition{
			condition(corev1.PodScheduled, true, now),
			condition(corev1.PodReadyToStartContainers, true, now),
			condition(corev1.PodInitialized, true, now),
			condition(corev1.ContainersReady, allReady, now),
			condition(corev1.PodReady, allReady, now),
		}
		_, err = m.client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, current, metav1.UpdateOptions{})
		return err
	})
	if err != nil && !apierrors.IsNotFound(err) {
		klog.Errorf("status of %s/%s: %v", pod.Namespace, pod.Name, err)
	}
}

// warn posts an Event on the pod, as a kubelet does, so `kubectl describe pod` says why it is stuck.
func (m *podManager) warn(ctx context.Context, pod *corev1.Pod, reason, message string) {
	now := metav1.Now()
	event := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{GenerateName: pod.Name + ".", Namespace: pod.Namespace},
		InvolvedObject: corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: pod.Namespace,
			Name: pod.Name, UID: pod.UID},
		Reason: reason, Message: message, Type: corev1.EventTypeWarning, Count: 1,
		FirstTimestamp: now, LastTimestamp: now, Source: corev1.EventSource{Component: "kubelet", Host: m.cfg.nodeName},
	}
	if _, err := m.client.CoreV1().Events(pod.Namespace).Create(ctx, event, metav1.CreateOptions{}); err != nil {
		klog.Warningf("event for %s/%s: %v", pod.Namespace, pod.Name, err)
	}
}
