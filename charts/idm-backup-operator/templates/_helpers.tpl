{{/* Names and labels shared by every template. */}}

{{- define "idm-backup-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "idm-backup-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "idm-backup-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "idm-backup-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "idm-backup-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "idm-backup-operator.labels" -}}
helm.sh/chart: {{ include "idm-backup-operator.chart" . }}
{{ include "idm-backup-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: idm-backup-operator
{{- end }}

{{- define "idm-backup-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "idm-backup-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespaces the operator watches in namespace mode (default: the release namespace). */}}
{{- define "idm-backup-operator.watchNamespaces" -}}
{{- $namespaces := .Values.watchNamespaces | default (list .Release.Namespace) }}
{{- toJson (uniq $namespaces) }}
{{- end }}

{{- define "idm-backup-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "idm-backup-operator.pvcRoot" -}}
/var/lib/idm-backup-operator/pvc
{{- end }}

{{/* The claim names of storage.pvcMounts, whose entries are a name or {claimName, namespaces}. */}}
{{- define "idm-backup-operator.pvcClaims" -}}
{{- $claims := list }}
{{- range .Values.storage.pvcMounts }}
{{- if kindIs "string" . }}
{{- $claims = append $claims . }}
{{- else }}
{{- $claims = append $claims .claimName }}
{{- end }}
{{- end }}
{{- toJson $claims }}
{{- end }}

{{/* The claims restricted to some namespaces, as the operator reads them (IDM_BACKUP_PVC_NAMESPACES). */}}
{{- define "idm-backup-operator.pvcNamespaces" -}}
{{- $restricted := dict }}
{{- range .Values.storage.pvcMounts }}
{{- if and (kindIs "map" .) .namespaces }}
{{- $_ := set $restricted .claimName .namespaces }}
{{- end }}
{{- end }}
{{- toJson $restricted }}
{{- end }}

{{/*
RBAC rules for the resources the operator handles and the objects a backup touches, in one namespace
(a Role) or in all of them (the ClusterRole). Every verb is traced to the code in docs/install.md
("What the RBAC grants, and why").
*/}}
{{- define "idm-backup-operator.namespacedRules" -}}
# kopf lists and watches each kind and merge-patches it (finalizers, its annotations);
# schedules list, create and (retention) delete their IdmBackups.
- apiGroups: [idm-backup.io]
  resources: [idmbackups]
  verbs: [get, list, watch, patch, create, delete]
# The operator never creates or deletes schedules, nor restores unless drills are enabled (below).
- apiGroups: [idm-backup.io]
  resources: [idmbackupschedules, idmrestores]
  verbs: [get, list, watch, patch]
# Phase, step, archive and conditions go to the status subresource.
- apiGroups: [idm-backup.io]
  resources: [idmbackups/status, idmbackupschedules/status, idmrestores/status]
  verbs: [patch]
# The target pod: by name (get) or by podSelector/host (list). Never created, changed or deleted.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list]
# ipa-backup, cat, sha256sum, ipactl in the FreeIPA pod. The Python client's exec is a websocket GET,
# authorized as get pods/exec and, since Kubernetes 1.35 (AuthorizePodWebsocketUpgradeCreatePermission),
# also as create pods/exec: both are needed.
- apiGroups: [""]
  resources: [pods/exec]
  verbs: [get, create]
# Referenced Secrets (S3 credentials, public keys, LDAP password and CAs) are read by name only:
# no list or watch, so the operator cannot enumerate Secrets.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# BackupStarted, BackupCompleted, ... (the operator's own and kopf's warnings).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if .Values.drills.enabled }}
# Restore drills: a schedule creates its drill IdmRestores and deletes all but the newest three; each
# drill creates its scratch pod, claim and deny-egress NetworkPolicy, and deletes them when it ends.
- apiGroups: [idm-backup.io]
  resources: [idmrestores]
  verbs: [create, delete]
- apiGroups: [""]
  resources: [pods, persistentvolumeclaims]
  verbs: [create, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [create, delete]
{{- end }}
{{- end }}

{{/*
kopf's peering, given the peering resource (kopfpeerings in a Role, clusterkopfpeerings in the
ClusterRole): kopf lists and watches every peering object of its scope, with no field selector, so
resourceNames cannot narrow list and watch; it merge-patches its keep-alive (status) into the object
named by --peering only. It never reads one by name: kopf's docs grant get too, its code (1.45) has
no use for it.
*/}}
{{- define "idm-backup-operator.peeringRules" -}}
# kopf's peering (--peering): it watches its scope's peering objects and keeps itself alive in one.
- apiGroups: [kopf.dev]
  resources: [{{ .resource }}]
  verbs: [list, watch]
- apiGroups: [kopf.dev]
  resources: [{{ .resource }}]
  resourceNames: [{{ .root.Values.peering.name | quote }}]
  verbs: [patch]
{{- end }}

{{/* The webhook: the Service in front of the pods, and the Secret with the serving certificate. */}}
{{- define "idm-backup-operator.webhookService" -}}
{{- printf "%s-webhook" (include "idm-backup-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "idm-backup-operator.webhookSecret" -}}
{{- if eq .Values.webhook.certificate.mode "secret" }}
{{- required "webhook.certificate.secretName is required with webhook.certificate.mode=secret (an existing kubernetes.io/tls Secret in the release namespace)" .Values.webhook.certificate.secretName }}
{{- else }}
{{- printf "%s-webhook-tls" (include "idm-backup-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Where the pod mounts the Secret: the operator's --webhook-cert-dir (tls.crt, tls.key). */}}
{{- define "idm-backup-operator.webhookCertDir" -}}
/etc/idm-backup-operator/webhook-tls
{{- end }}

{{/* kopf's discovery: a watch on CRDs (cluster-scoped, read-only). */}}
{{- define "idm-backup-operator.crdDiscoveryRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end }}
