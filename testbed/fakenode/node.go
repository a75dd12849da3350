package main

import (
	"context"
	"fmt"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

const leaseSeconds = 40

// registerNode creates the Node (or takes over an existing one of the same name) and reports it Ready on
// the loopback address, so the API server dials this process, and only it, for exec and logs.
func registerNode(ctx context.Context, client kubernetes.Interface, cfg config) error {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name: cfg.nodeName,
		Labels: map[string]string{
			"kubernetes.io/hostname": cfg.nodeName,
			"kubernetes.io/os":       "linux",
			"kubernetes.io/arch":     "amd64",
			"type":                   "testbed",
		},
	}}
	_, err := client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return updateNodeStatus(ctx, client, cfg)
}

func updateNodeStatus(ctx context.Context, client kubernetes.Interface, cfg config) error {
	node, err := client.CoreV1().Nodes().Get(ctx, cfg.nodeName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	now := metav1.Now()
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse("32"),
		corev1.ResourceMemory:           resource.MustParse("64Gi"),
		corev1.ResourcePods:             resource.MustParse("250"),
		corev1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
	}
	node.Status.Capacity, node.Status.Allocatable = capacity, capacity
	node.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: cfg.address},
		{Type: corev1.NodeHostName, Address: cfg.nodeName},
	}
	node.Status.DaemonEndpoints.KubeletEndpoint.Port = int32(cfg.port)
	node.Status.NodeInfo = corev1.NodeSystemInfo{
		KubeletVersion: "testbed-fakenode", OperatingSystem: "linux", Architecture: "amd64",
		ContainerRuntimeVersion: "testbed://overlay-sandbox",
	}
	node.Status.Conditions = []corev1.NodeCondition{
		{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
			Message: "fakenode is posting ready status", LastHeartbeatTime: now, LastTransitionTime: now},
		{Type: corev1.NodeMemoryPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientMemory",
			LastHeartbeatTime: now, LastTransitionTime: now},
		{Type: corev1.NodeDiskPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasNoDiskPressure",
			LastHeartbeatTime: now, LastTransitionTime: now},
		{Type: corev1.NodePIDPressure, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficientPID",
			LastHeartbeatTime: now, LastTransitionTime: now},
	}
	_, err = client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	return err
}

// heartbeat renews the node Lease and the Ready condition: without them the node lifecycle controller
// taints the node and evicts its pods after its grace period.
func heartbeat(ctx context.Context, client kubernetes.Interface, cfg config) {
	ticker := time.NewTicker(10 * time.Second)
	defer ticker.Stop()
	for round := 0; ; round++ {
		if err := renewLease(ctx, client, cfg.nodeName); err != nil {
			klog.Warningf("renewing node lease: %v", err)
		}
		if round%3 == 2 {
			if err := updateNodeStatus(ctx, client, cfg); err != nil {
				klog.Warningf("updating node status: %v", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

func renewLease(ctx context.Context, client kubernetes.Interface, nodeName string) error {
	leases := client.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	lease, err := leases.Get(ctx, nodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		node, nodeErr := client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
		if nodeErr != nil {
			return nodeErr
		}
		lease = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: nodeName, OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "v1", Kind: "Node", Name: nodeName, UID: node.UID}}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(nodeName),
				LeaseDurationSeconds: ptr.To[int32](leaseSeconds), RenewTime: &now},
		}
		_, err = leases.Create(ctx, lease, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return fmt.Errorf("get lease: %w", err)
	}
	lease.Spec.RenewTime = &now
	_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
	return err
}
