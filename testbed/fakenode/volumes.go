package main

import (
	"context"
	"os"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

const (
	storageClassName = "testbed"
	provisionerName  = "testbed.idm-backup.io/hostpath"
)

// volumeDir is where a provisioned volume's data lives on this host; a pod mounting the claim sees it.
func volumeDir(cfg config, pvName string) string {
	return filepath.Join(cfg.stateDir, "volumes", pvName)
}

// provisionVolumes is a minimal dynamic provisioner: claims of the default "testbed" class get a
// hostPath PersistentVolume under the state directory, which the PV controller then binds. Without it
// the scheduler refuses every pod that mounts a claim, as it does on a real cluster with no provisioner.
func provisionVolumes(ctx context.Context, client kubernetes.Interface, cfg config) {
	ensureStorageClass(ctx, client)
	factory := informers.NewSharedInformerFactory(client, 30*time.Second)
	claims := factory.Core().V1().PersistentVolumeClaims().Informer()
	volumes := factory.Core().V1().PersistentVolumes().Informer()
	onClaim := func(obj any) {
		if pvc, ok := obj.(*corev1.PersistentVolumeClaim); ok {
			provision(ctx, client, cfg, pvc)
		}
	}
	onVolume := func(obj any) {
		if pv, ok := obj.(*corev1.PersistentVolume); ok {
			reclaim(ctx, client, cfg, pv)
		}
	}
	_, _ = claims.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: onClaim, UpdateFunc: func(_, obj any) { onClaim(obj) }})
	_, _ = volumes.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: onVolume, UpdateFunc: func(_, obj any) { onVolume(obj) }})
	factory.Start(ctx.Done())
	<-ctx.Done()
}

func ensureStorageClass(ctx context.Context, client kubernetes.Interface) {
	class := &storagev1.StorageClass{
		ObjectMeta: metav1.ObjectMeta{Name: storageClassName, Annotations: map[string]string{
			"storageclass.kubernetes.io/is-default-class": "true"}},
		Provisioner:       provisionerName,
		ReclaimPolicy:     ptr.To(corev1.PersistentVolumeReclaimDelete),
		VolumeBindingMode: ptr.To(storagev1.VolumeBindingImmediate),
	}
	_, err := client.StorageV1().StorageClasses().Create(ctx, class, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		klog.Warningf("creating storage class: %v", err)
	}
}

func provision(ctx context.Context, client kubernetes.Interface, cfg config, pvc *corev1.PersistentVolumeClaim) {
	if pvc.Status.Phase != corev1.ClaimPending || pvc.Spec.VolumeName != "" ||
		pvc.Spec.StorageClassName == nil || *pvc.Spec.StorageClassName != storageClassName {
		return
	}
	name := "pvc-" + string(pvc.UID)
	dir := volumeDir(cfg, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		klog.Errorf("volume directory for %s/%s: %v", pvc.Namespace, pvc.Name, err)
		return
	}
	size := pvc.Spec.Resources.Requests[corev1.ResourceStorage]
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{
			"pv.kubernetes.io/provisioned-by": provisionerName}},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: size},
			AccessModes:                   pvc.Spec.AccessModes,
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimDelete,
			StorageClassName:              storageClassName,
			PersistentVolumeSource: corev1.PersistentVolumeSource{HostPath: &corev1.HostPathVolumeSource{
				Path: dir, Type: ptr.To(corev1.HostPathDirectory)}},
			ClaimRef: &corev1.ObjectReference{Kind: "PersistentVolumeClaim", APIVersion: "v1",
				Namespace: pvc.Namespace, Name: pvc.Name, UID: pvc.UID},
		},
	}
	_, err := client.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		klog.Errorf("provisioning %s for %s/%s: %v", name, pvc.Namespace, pvc.Name, err)
	}
}

// reclaim finishes the Delete reclaim policy, which for a dynamically provisioned volume is the
// provisioner's job, not the PV controller's.
func reclaim(ctx context.Context, client kubernetes.Interface, cfg config, pv *corev1.PersistentVolume) {
	if pv.Status.Phase != corev1.VolumeReleased || pv.Annotations["pv.kubernetes.io/provisioned-by"] != provisionerName ||
		pv.Spec.PersistentVolumeReclaimPolicy != corev1.PersistentVolumeReclaimDelete {
		return
	}
	if err := os.RemoveAll(volumeDir(cfg, pv.Name)); err != nil {
		klog.Errorf("removing data of %s: %v", pv.Name, err)
		return
	}
	err := client.CoreV1().PersistentVolumes().Delete(ctx, pv.Name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		klog.Errorf("deleting %s: %v", pv.Name, err)
	}
}
