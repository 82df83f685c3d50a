{{/*
Named templates shared by every component. Component templates pass a dict:
  root: the chart's top-level context (.), component: the values key ("gateway", "triton", ...).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "swapline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-swapline", or the release name alone when it already holds the chart name. */}}
{{- define "swapline.fullname" -}}
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

{{- define "swapline.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of one component's objects: "<fullname>-<component>". */}}
{{- define "swapline.componentName" -}}
{{- printf "%s-%s" (include "swapline.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable for the life of a release, so never the version. */}}
{{- define "swapline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "swapline.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every object's labels. */}}
{{- define "swapline.labels" -}}
helm.sh/chart: {{ include "swapline.chart" .root }}
{{ include "swapline.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: swapline
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of the objects shared by components (media volume, rules, dashboard). */}}
{{- define "swapline.sharedLabels" -}}
{{ include "swapline.labels" (dict "root" . "component" "shared") }}
{{- end }}

{{- define "swapline.serviceAccountName" -}}
{{- $values := index .root.Values .component }}
{{- if $values.serviceAccount.create }}
{{- default (include "swapline.componentName" .) $values.serviceAccount.name }}
{{- else }}
{{- default "default" $values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository:tag" of a component: its own image fields, else the global swapline image's. */}}
{{- define "swapline.image" -}}
{{- $values := index .root.Values .component }}
{{- $repository := default .root.Values.image.repository $values.image.repository }}
{{- $tag := default (default .root.Chart.AppVersion .root.Values.image.tag) $values.image.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "swapline.imagePullPolicy" -}}
{{- $values := index .root.Values .component }}
{{- default .root.Values.image.pullPolicy $values.image.pullPolicy }}
{{- end }}

{{/* The headless Service's DNS name of a component. */}}
{{- define "swapline.serviceHost" -}}
{{- printf "%s.%s.svc.%s" (include "swapline.componentName" .) .root.Release.Namespace .root.Values.clusterDomain }}
{{- end }}

{{/*
The gRPC target clients dial: dns:/// resolves every pod address of the headless Service, and
services/common/grpc_channel.py balances round-robin across them.
*/}}
{{- define "swapline.grpcTarget" -}}
{{- $values := index .root.Values .component }}
{{- printf "dns:///%s:%d" (include "swapline.serviceHost" .) (int $values.ports.grpc) }}
{{- end }}

{{/* SWAPLINE_<COMPONENT>_, the env prefix of a settings class. */}}
{{- define "swapline.envPrefix" -}}
{{- printf "SWAPLINE_%s_" (upper .) }}
{{- end }}

{{/* A scalar as an env value: whole numbers without an exponent (YAML numbers arrive as float64). */}}
{{- define "swapline.envValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* Seconds between SIGTERM's arrival and SIGKILL: preStop sleep, then the server's drain, then a margin. */}}
{{- define "swapline.terminationGracePeriod" -}}
{{- $grpc := .root.Values.grpc }}
{{- $values := index .root.Values .component }}
{{- add (ceil $values.drainSeconds | int) $grpc.preStopSleepSeconds $grpc.terminationMarginSeconds }}
{{- end }}

{{- define "swapline.preStop" -}}
preStop:
  exec:
    command: ["sleep", "{{ .root.Values.grpc.preStopSleepSeconds }}"]
{{- end }}

{{- define "swapline.mediaClaimName" -}}
{{- default (printf "%s-media" (include "swapline.fullname" .)) .Values.media.persistence.existingClaim }}
{{- end }}

{{/* Fails the render when two settings would fight: the chart's own choices and the values'. */}}
{{- define "swapline.validate" -}}
{{- if and .Values.monitoring.serviceMonitor.enabled .Values.monitoring.podMonitor.enabled }}
{{- fail "monitoring.serviceMonitor.enabled and monitoring.podMonitor.enabled both scrape every pod; enable one" }}
{{- end }}
{{- if and (eq .Values.jobStore.type "sqlite") (or (gt (int .Values.gateway.replicaCount) 1) .Values.gateway.autoscaling.enabled) }}
{{- fail "jobStore.type sqlite serves one gateway: set gateway.replicaCount 1 and gateway.autoscaling.enabled false, or use jobStore.type postgresql" }}
{{- end }}
{{- if and .Values.autoscaling.engine (eq .Values.autoscaling.engine "hpa") .Values.triton.autoscaling.enabled (eq .Values.triton.autoscaling.signal "queueRatio") }}
{{- fail "triton.autoscaling.signal queueRatio needs autoscaling.engine keda; with hpa use pendingRequests or advisor" }}
{{- end }}
{{- range $component := list "worker" "triton" }}
{{- $autoscaling := (index $.Values $component).autoscaling }}
{{- if and $autoscaling.enabled (eq $autoscaling.signal "advisor") (not $.Values.advisor.enabled) }}
{{- fail (printf "%s.autoscaling.signal advisor needs advisor.enabled" $component) }}
{{- end }}
{{- end }}
{{- range $component := list "gateway" "worker" "decoder" "detector" "encoder" "advisor" "triton" }}
{{- $autoscaling := (index $.Values $component).autoscaling }}
{{- if and $autoscaling.enabled (lt (int $autoscaling.maxReplicas) (int $autoscaling.minReplicas)) }}
{{- fail (printf "%s.autoscaling.maxReplicas is below minReplicas" $component) }}
{{- end }}
{{- end }}
{{- end }}
