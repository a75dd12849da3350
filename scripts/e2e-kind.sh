#!/usr/bin/env bash
# End to end on a real cluster: kind, the operator's image and Helm chart, and a real FreeIPA
# (quay.io/freeipa/freeipa-server) master plus hidden replica, backed up by an IdmBackup to a PVC and
# decrypted again here.
#
# For a machine with Docker, kind, kubectl, helm and gpg. This repository's CI has no container engine and
# cannot run it; the local platform (testbed/) covers the operator with a FreeIPA stand-in instead.
# FreeIPA's own installation takes 10-20 minutes per server and about 3 GiB of memory each.
#
#   bash scripts/e2e-kind.sh            # create the cluster, run, delete the cluster on success
#   KEEP_CLUSTER=1 bash scripts/e2e-kind.sh
#
# Environment: CLUSTER (idm-backup-e2e), KIND_NODE_IMAGE (kind's default), FREEIPA_IMAGE
# (quay.io/freeipa/freeipa-server:almalinux-9), IMAGE (idm-backup-operator:e2e), TIMEOUT_INSTALL (1800s).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-idm-backup-e2e}
IMAGE=${IMAGE:-idm-backup-operator:e2e}
FREEIPA_IMAGE=${FREEIPA_IMAGE:-quay.io/freeipa/freeipa-server:almalinux-9}
TIMEOUT_INSTALL=${TIMEOUT_INSTALL:-1800}
OPS_NS=idm-backup-system
IPA_NS=identity
REALM=IPA.TEST
# Pods of both StatefulSets get <pod>.ipa.identity.svc.cluster.local from the headless Service "ipa"
# (setHostnameAsFQDN); FreeIPA's domain is that suffix. A FreeIPA host name must fit in 64 characters.
DOMAIN=ipa.$IPA_NS.svc.cluster.local
MASTER_HOST=ipa-master-0.$DOMAIN
HIDDEN_HOST=ipa-hidden-0.$DOMAIN

log() { printf '\n== %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null || { echo "e2e-kind: $1 is required" >&2; exit 2; }; }
for tool in docker kind kubectl helm gpg; do need "$tool"; done

work=$(mktemp -d)
export KUBECONFIG=$work/kubeconfig
cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    log "FAILED (exit $rc): diagnostics"
    kubectl get pods,pvc,idmbackups -A -o wide || true
    kubectl -n "$IPA_NS" describe idmbackups || true
    kubectl -n "$OPS_NS" logs deploy/idm-backup-operator --tail=200 || true
    echo "cluster $CLUSTER kept for debugging: kind delete cluster --name $CLUSTER" >&2
  elif [ -z "${KEEP_CLUSTER:-}" ]; then
    kind delete cluster --name "$CLUSTER"
  else
    echo "cluster kept: KUBECONFIG=$KUBECONFIG (kind export kubeconfig --name $CLUSTER)" >&2
  fi
  gpgconf --homedir "$work/gnupg" --kill gpg-agent 2>/dev/null || true
  [ $rc -ne 0 ] || rm -rf "$work"
}
trap cleanup EXIT

log "kind cluster $CLUSTER"
if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --config kind-config.yaml ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 5m
fi
kind export kubeconfig --name "$CLUSTER" --kubeconfig "$KUBECONFIG"

log "operator image $IMAGE"
docker build -t "$IMAGE" .
docker run --rm "$IMAGE" --version
kind load docker-image "$IMAGE" --name "$CLUSTER"

log "namespaces, backup PVC"
kubectl create namespace "$OPS_NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl create namespace "$IPA_NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$OPS_NS" apply -f - <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: backups}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 20Gi}}
YAML

log "helm install (namespace mode, watching $IPA_NS; the chart installs the CRDs on this first install)"
helm upgrade --install idm-backup-operator charts/idm-backup-operator -n "$OPS_NS" \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=Never \
  --set rbac.scope=namespace --set "watchNamespaces={$IPA_NS}" \
  --set "storage.pvcMounts={backups}" --set logFormat=text \
  --wait --timeout 10m
kubectl wait --for=condition=Established crd/idmbackups.idm-backup.io crd/idmbackupschedules.idm-backup.io

log "FreeIPA master and hidden replica ($FREEIPA_IMAGE)"
password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
kubectl -n "$IPA_NS" create secret generic freeipa-password --from-literal=password="$password" \
  --dry-run=client -o yaml | kubectl apply -f -
# What the operator reads: the Directory Manager password (PASSWORD sets both DM and admin passwords).
kubectl -n "$IPA_NS" create secret generic freeipa-dm-password --from-literal=password="$password" \
  --dry-run=client -o yaml | kubectl apply -f -

freeipa_statefulset() {
  # $1: name, $2...: the container's arguments (ipa-server-install or ipa-replica-install and options)
  local name=$1; shift
  local args="" a
  for a in "$@"; do args+="\"$a\", "; done
  kubectl -n "$IPA_NS" apply -f - <<YAML
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: $name}
spec:
  serviceName: ipa
  replicas: 1
  selector: {matchLabels: {app: $name}}
  template:
    metadata: {labels: {app: $name, idm-backup.io/freeipa: "true"}}
    spec:
      # freeipa-container on Kubernetes: its own user namespace instead of privileges, systemd inside.
      hostUsers: false
      subdomain: ipa
      setHostnameAsFQDN: true
      terminationGracePeriodSeconds: 120
      containers:
        - name: freeipa-server
          image: $FREEIPA_IMAGE
          args: [${args%, }]
          env:
            - name: PASSWORD
              valueFrom: {secretKeyRef: {name: freeipa-password, key: password}}
            # No integrated DNS here: the cluster's DNS names the pods; keep IPA from rewriting records.
            - name: IPA_SERVER_IP
              value: no-update
          securityContext:
            readOnlyRootFilesystem: true
          volumeMounts:
            - {name: data, mountPath: /data}
            - {name: run, mountPath: /run}
            - {name: tmp, mountPath: /tmp}
          readinessProbe:
            exec:
              command: ["/usr/bin/systemctl", "status", "ipa"]
            initialDelaySeconds: 60
            periodSeconds: 10
            timeoutSeconds: 10
            failureThreshold: 3
          resources:
            requests: {memory: 2Gi, cpu: 500m}
      volumes:
        - {name: run, emptyDir: {}}
        - {name: tmp, emptyDir: {}}
  volumeClaimTemplates:
    - metadata: {name: data}
      spec:
        accessModes: [ReadWriteOnce]
        resources: {requests: {storage: 10Gi}}
YAML
}

kubectl -n "$IPA_NS" apply -f - <<YAML
apiVersion: v1
kind: Service
metadata: {name: ipa}
spec:
  clusterIP: None
  # Pods resolve each other during installation, before they are ready.
  publishNotReadyAddresses: true
  selector: {idm-backup.io/freeipa: "true"}
  ports:
    - {name: ldap, port: 389}
    - {name: ldaps, port: 636}
    - {name: https, port: 443}
    - {name: kerberos, port: 88}
YAML

wait_ready() {
  log "waiting up to ${TIMEOUT_INSTALL}s for $1 (FreeIPA installs itself on first start)"
  kubectl -n "$IPA_NS" logs -f "$1" --pod-running-timeout=10m > "$work/$1.log" 2>&1 &
  local logs=$!
  if ! kubectl -n "$IPA_NS" wait --for=condition=Ready "pod/$1" --timeout="${TIMEOUT_INSTALL}s"; then
    tail -50 "$work/$1.log" >&2
    kill $logs 2>/dev/null || true
    return 1
  fi
  kill $logs 2>/dev/null || true
}

freeipa_statefulset ipa-master ipa-server-install -U -r "$REALM" --no-ntp --no-host-dns --skip-mem-check
until kubectl -n "$IPA_NS" get pod ipa-master-0 >/dev/null 2>&1; do sleep 2; done
wait_ready ipa-master-0

# A hidden replica with every role the topology uses (here: CA), so ipa-backup's role check passes.
freeipa_statefulset ipa-hidden ipa-replica-install -U --hidden-replica --setup-ca \
  --server="$MASTER_HOST" --domain="$DOMAIN" -r "$REALM" -P "admin@$REALM" \
  --no-ntp --no-host-dns --skip-mem-check
until kubectl -n "$IPA_NS" get pod ipa-hidden-0 >/dev/null 2>&1; do sleep 2; done
wait_ready ipa-hidden-0
[ "$(kubectl -n "$IPA_NS" exec ipa-hidden-0 -- hostname -f)" = "$HIDDEN_HOST" ]
echo "$password" | kubectl -n "$IPA_NS" exec -i ipa-hidden-0 -- kinit admin >/dev/null
# The roles of a hidden replica are reported with the status "hidden".
kubectl -n "$IPA_NS" exec ipa-hidden-0 -- ipa server-role-find --server="$HIDDEN_HOST" \
  | tee /dev/stderr | grep -qi 'role status: hidden'

log "secrets the IdmBackup references: LDAP CA, backup public key"
kubectl -n "$IPA_NS" exec ipa-hidden-0 -- cat /etc/ipa/ca.crt > "$work/ipa-ca.crt"
kubectl -n "$IPA_NS" create secret generic freeipa-ca --from-file=ca.crt="$work/ipa-ca.crt" \
  --dry-run=client -o yaml | kubectl apply -f -
mkdir -m 700 "$work/gnupg"
gpg --homedir "$work/gnupg" --batch --pinentry-mode loopback --passphrase '' \
  --quick-generate-key "IdM Restore <restore@example.test>" default default never
gpg --homedir "$work/gnupg" --armor --export restore@example.test > "$work/restore.asc"
kubectl -n "$IPA_NS" create secret generic backup-public-keys --from-file=restore.asc="$work/restore.asc" \
  --dry-run=client -o yaml | kubectl apply -f -

log "the admission webhook refuses a backup whose key Secret does not exist"
if refusal=$(kubectl -n "$IPA_NS" apply -f - 2>&1 <<YAML
apiVersion: idm-backup.io/v1alpha1
kind: IdmBackup
metadata: {name: e2e-refused}
spec:
  type: Data
  online: true
  target: {podName: ipa-hidden-0, ldap: {url: "ldaps://$HIDDEN_HOST", passwordSecretRef: {name: freeipa-dm-password}}}
  encryption: {publicKeysSecretRef: {name: no-such-keys}}
  storage: {pvc: {claimName: backups}}
YAML
); then
  echo "expected a refusal, got: $refusal" >&2; exit 1
fi
echo "$refusal"
grep -q 'denied the request: IdmBackup e2e-refused refused' <<<"$refusal"

log "IdmBackup: Full, offline, on the hidden replica, to the PVC"
kubectl -n "$IPA_NS" apply -f - <<YAML
apiVersion: idm-backup.io/v1alpha1
kind: IdmBackup
metadata: {name: e2e-full}
spec:
  type: Full
  target:
    podName: ipa-hidden-0
    ldap:
      url: ldaps://$HIDDEN_HOST
      passwordSecretRef: {name: freeipa-dm-password}
      caSecretRef: {name: freeipa-ca}
  encryption:
    publicKeysSecretRef: {name: backup-public-keys}
  storage:
    pvc: {claimName: backups, subPath: e2e}
  podCleanup: Keep
YAML
phase=""
for _ in $(seq 1 360); do
  phase=$(kubectl -n "$IPA_NS" get idmbackup e2e-full -o jsonpath='{.status.phase}')
  case $phase in Succeeded|Failed) break ;; esac
  sleep 5
done
kubectl -n "$IPA_NS" get idmbackup e2e-full -o yaml
[ "$phase" = Succeeded ]
kubectl -n "$IPA_NS" exec ipa-hidden-0 -- ipactl status

log "the stored archive decrypts to ipa-backup's tar"
archive=$(kubectl -n "$IPA_NS" get idmbackup e2e-full -o jsonpath='{.status.archive.uri}')
plain_sha=$(kubectl -n "$IPA_NS" get idmbackup e2e-full -o jsonpath='{.status.archive.plaintextSHA256}')
echo "archive: $archive"
pod=$(kubectl -n "$OPS_NS" get pods -l app.kubernetes.io/instance=idm-backup-operator -o jsonpath='{.items[0].metadata.name}')
# A PVC archive's URI is its path in the operator pod.
kubectl -n "$OPS_NS" exec "$pod" -- cat "$archive" > "$work/archive.tar.gpg"
gpg --homedir "$work/gnupg" --batch --pinentry-mode loopback --passphrase '' \
  --decrypt "$work/archive.tar.gpg" > "$work/archive.tar"
echo "$plain_sha  $work/archive.tar" | sha256sum -c -
tar -tf "$work/archive.tar" | head

log "OK: $0"
