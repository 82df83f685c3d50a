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

{{/*
"repository:tag" of a component: its own image fields, else the global swapline image's. Optional argument:
values (the values block holding `image`, for a sidecar; default the component's).
*/}}
{{- define "swapline.image" -}}
{{- $values := default (index .root.Values .component) .values }}
{{- $repository := default .root.Values.image.repository $values.image.repository }}
{{- $tag := default (default .root.Chart.AppVersion .root.Values.image.tag) $values.image.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "swapline.imagePullPolicy" -}}
{{- $values := default (index .root.Values .component) .values }}
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

{{/* The workers' target of the model residency sidecars: the Triton Service's residency port. */}}
{{- define "swapline.residencyTarget" -}}
{{- $context := dict "root" . "component" "triton" }}
{{- printf "dns:///%s:%d" (include "swapline.serviceHost" $context) (int .Values.triton.residency.port) }}
{{- end }}

{{/* The workers' target: the gateway's internal Service and port (the chunk queue). */}}
{{- define "swapline.gatewayInternalTarget" -}}
{{- $context := dict "root" . "component" "gateway-internal" }}
{{- printf "dns:///%s:%d" (include "swapline.serviceHost" $context) (int .Values.gateway.ports.internal) }}
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

{{/*
A node affinity requiring a GPU node: GPU feature discovery labels each with nvidia.com/gpu.product. The
argument is the list of accepted products; empty accepts any GPU node.
*/}}
{{- define "swapline.gpuNodeAffinity" -}}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      - matchExpressions:
          - key: nvidia.com/gpu.product
            {{- if . }}
            operator: In
            values:
              {{- toYaml . | nindent 14 }}
            {{- else }}
            operator: Exists
            {{- end }}
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
{{- $engineCache := .Values.triton.engineCache.persistence }}
{{- $cacheOnOneNode := or (has "ReadWriteOnce" $engineCache.accessModes) (has "ReadWriteOncePod" $engineCache.accessModes) }}
{{- if and $engineCache.enabled $cacheOnOneNode (or (gt (int .Values.triton.replicaCount) 1) .Values.triton.autoscaling.enabled) }}
{{- fail "triton.engineCache.persistence: a ReadWriteOnce (or ReadWriteOncePod) claim attaches to one node (or pod) at a time, so a second Triton pod (triton.replicaCount above 1 or triton.autoscaling.enabled), commonly on another GPU node, cannot start: set accessModes [ReadWriteMany], or persistence.enabled false for an engine cache per pod" }}
{{- end }}
{{- $residency := .Values.triton.residency }}
{{- if and $residency.enabled (gt (int64 $residency.memoryBudgetBytes) 0) (ne .Values.triton.modelRepository.source "pvc") }}
{{- fail "triton.residency.memoryBudgetBytes needs triton.modelRepository.source pvc: the residency sidecar estimates models never loaded from the repository's files, which object storage does not give it" }}
{{- end }}
{{- if and $residency.enabled (or (gt (int .Values.triton.replicaCount) 1) .Values.triton.autoscaling.enabled) }}
{{- fail "triton.residency.enabled manages one Triton pod's models: each sidecar loads a model on its own pod, while a worker's requests may reach another. With several Triton pods (triton.replicaCount above 1 or triton.autoscaling.enabled) set triton.residency.enabled false, so that every pod loads every model" }}
{{- end }}
{{- if $residency.enabled }}
{{- range .Values.triton.extraArgs }}
{{- if hasPrefix "--model-control-mode" . }}
{{- fail "triton.extraArgs: with triton.residency.enabled the chart sets --model-control-mode=explicit itself" }}
{{- end }}
{{- end }}
{{- end }}
{{- $readingPrometheus := list }}
{{- range $component := list "worker" "triton" }}
{{- $autoscaling := (index $.Values $component).autoscaling }}
{{- if and $autoscaling.enabled (eq $autoscaling.signal "advisor") (not $.Values.advisor.enabled) }}
{{- fail (printf "%s.autoscaling.signal advisor needs advisor.enabled" $component) }}
{{- end }}
{{- if $autoscaling.enabled }}
{{- $readingPrometheus = append $readingPrometheus $component }}
{{- end }}
{{- end }}
{{- $monitored := or .Values.monitoring.serviceMonitor.enabled .Values.monitoring.podMonitor.enabled }}
{{- if and $readingPrometheus (eq .Values.autoscaling.prometheusScrape "monitors") (not $monitored) }}
{{- fail (printf "%s autoscaling reads its signal from Prometheus, which scrapes nothing of swapline without a monitor (an unscraped signal reads as no load): enable monitoring.serviceMonitor or monitoring.podMonitor, or set autoscaling.prometheusScrape external if a Prometheus of your own configuration scrapes the metrics ports" (join " and " $readingPrometheus)) }}
{{- end }}
{{- $worker := .Values.worker }}
{{- /* The workers' own default concurrency (services/worker/settings.py) where the values leave it unset. */}}
{{- $concurrency := int (default 1 $worker.settings.concurrency) }}
{{- if and $worker.autoscaling.enabled (eq $worker.autoscaling.signal "openChunks") (gt (int $worker.autoscaling.openChunksPerReplica) $concurrency) }}
{{- fail (printf "worker.autoscaling.openChunksPerReplica %d is above the workers' concurrency %d: the chunks busy workers hold would ask for fewer workers than hold them, and busy workers would be scaled in; set it to at most worker.settings.concurrency" (int $worker.autoscaling.openChunksPerReplica) $concurrency) }}
{{- end }}
{{- if and .Values.tls.certManager.enabled .Values.tls.existingSecret }}
{{- fail "tls.existingSecret and tls.certManager.enabled both provide every component's certificate; keep one" }}
{{- end }}
{{- $tenants := .Values.auth.tenantTokens }}
{{- if and $tenants.existingSecret $tenants.tokens }}
{{- fail "auth.tenantTokens.existingSecret and auth.tenantTokens.tokens both provide the tenants; keep one" }}
{{- end }}
{{- $owners := dict }}
{{- range $tenants.tokens }}
{{- if hasKey $owners .token }}
{{- fail (printf "auth.tenantTokens.tokens: tenants %s and %s share a token; each token must name one tenant" (index $owners .token) .tenant) }}
{{- end }}
{{- $_ := set $owners .token .tenant }}
{{- end }}
{{- range $component := list "gateway" "worker" "decoder" "detector" "encoder" "advisor" "triton" }}
{{- $autoscaling := (index $.Values $component).autoscaling }}
{{- if and $autoscaling.enabled (lt (int $autoscaling.maxReplicas) (int $autoscaling.minReplicas)) }}
{{- fail (printf "%s.autoscaling.maxReplicas is below minReplicas" $component) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Security of the swapline gRPC services. Fixed mount paths: the settings name them, nothing else needs to.
*/}}
{{- define "swapline.tlsMountPath" -}}/etc/swapline/tls{{- end }}
{{- define "swapline.internalTokenMountPath" -}}/etc/swapline/internal-token{{- end }}
{{- define "swapline.tenantTokensMountPath" -}}/etc/swapline/tenant-tokens{{- end }}

{{/* The services' transport_security: plaintext only when open mode is asked for. */}}
{{- define "swapline.transportSecurity" -}}
{{- if .Values.security.openMode }}plaintext{{ else }}{{ .Values.security.transportSecurity }}{{ end }}
{{- end }}

{{/*
The Python services that serve gRPC, hence carry a certificate and the internal token; "triton" stands for
the model residency sidecar of the Triton pods, which answers at the Triton Service's names.
*/}}
{{- define "swapline.tlsComponents" -}}
{{- $components := list "gateway" "worker" "decoder" "detector" "encoder" }}
{{- if .Values.advisor.enabled }}
{{- $components = append $components "advisor" }}
{{- end }}
{{- if .Values.triton.residency.enabled }}
{{- $components = append $components "triton" }}
{{- end }}
{{- toJson $components }}
{{- end }}

{{/* Where a component's certificate comes from: "given" (a Secret in values), "certManager" or "generated". */}}
{{- define "swapline.tlsSource" -}}
{{- $tls := .root.Values.tls }}
{{- if or (index $tls.componentSecrets .component) $tls.existingSecret }}given
{{- else if $tls.certManager.enabled }}certManager
{{- else }}generated
{{- end }}
{{- end }}

{{- define "swapline.tlsSecretName" -}}
{{- $tls := .root.Values.tls }}
{{- $given := default $tls.existingSecret (index $tls.componentSecrets .component) }}
{{- default (printf "%s-tls" (include "swapline.componentName" .)) $given }}
{{- end }}

{{/* Every name a component's Services answer to, as a JSON list; the gateway's include the public ones. */}}
{{- define "swapline.tlsDnsNames" -}}
{{- $root := .root }}
{{- $services := list .component }}
{{- if eq .component "gateway" }}
{{- $services = append $services "gateway-internal" }}
{{- end }}
{{- $names := list }}
{{- range $services }}
{{- $service := include "swapline.componentName" (dict "root" $root "component" .) }}
{{- $names = concat $names (list $service
  (printf "%s.%s" $service $root.Release.Namespace)
  (printf "%s.%s.svc" $service $root.Release.Namespace)
  (include "swapline.serviceHost" (dict "root" $root "component" .))) }}
{{- end }}
{{- if eq .component "gateway" }}
{{- $names = concat $names $root.Values.tls.gatewayDnsNames }}
{{- end }}
{{- toJson (uniq $names) }}
{{- end }}

{{- define "swapline.tlsIpAddresses" -}}
{{- toJson (ternary .root.Values.tls.gatewayIpAddresses (list) (eq .component "gateway")) }}
{{- end }}

{{/*
The private CA that signs generated certificates, computed once per render and stored on the root
context: the one kept in <fullname>-tls-ca when it exists, else a new one.
*/}}
{{- define "swapline.generatedCa" -}}
{{- if not (hasKey . "swaplineGeneratedCa") }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (printf "%s-tls-ca" (include "swapline.fullname" .)) }}
{{- $cert := dig "data" "tls.crt" "" $existing }}
{{- $key := dig "data" "tls.key" "" $existing }}
{{- $ca := dict }}
{{- if and $cert $key }}
{{- $ca = buildCustomCert $cert $key }}
{{- else }}
{{- $ca = genCAWithKey (printf "%s CA" (include "swapline.fullname" .)) 3650 (genPrivateKey "ecdsa") }}
{{- end }}
{{- $_ := set . "swaplineGeneratedCa" $ca }}
{{- end }}
{{- end }}

{{- define "swapline.anyGeneratedTls" -}}
{{- if not .Values.security.openMode }}
{{- range (include "swapline.tlsComponents" $ | fromJsonArray) }}
{{- if eq (include "swapline.tlsSource" (dict "root" $ "component" .)) "generated" }}true{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "swapline.internalTokenSecretName" -}}
{{- default (printf "%s-internal-token" (include "swapline.fullname" .)) .Values.auth.internalToken.existingSecret }}
{{- end }}

{{- define "swapline.tenantTokensSecretName" -}}
{{- $gateway := include "swapline.componentName" (dict "root" . "component" "gateway") }}
{{- default (printf "%s-tenant-tokens" $gateway) .Values.auth.tenantTokens.existingSecret }}
{{- end }}

{{/* "true" when the gateway has tenant tokens to mount. */}}
{{- define "swapline.tenantTokensConfigured" -}}
{{- if or .Values.auth.tenantTokens.existingSecret .Values.auth.tenantTokens.tokens }}true{{ end }}
{{- end }}

{{/* The tenant tokens file the chart renders: one `TOKEN TENANT` line each. */}}
{{- define "swapline.tenantTokensFile" -}}
{{- range .Values.auth.tenantTokens.tokens }}
{{ .token }} {{ .tenant }}
{{- end }}
{{- end }}

{{/*
What a Python gRPC service adds for security (dict root, component, tenantTokens; optional envPrefix, default
the component's): env, volumes and volumeMounts, as YAML. Open mode sets plaintext and open and mounts nothing.
*/}}
{{- define "swapline.securityParts" -}}
{{- $root := .root }}
{{- $prefix := default (include "swapline.envPrefix" .component) .envPrefix }}
{{- $security := $root.Values.security }}
{{- $env := list
  (dict "name" (printf "%sTRANSPORT_SECURITY" $prefix) "value" (include "swapline.transportSecurity" $root))
  (dict "name" (printf "%sAUTH_MODE" $prefix) "value" (ternary "open" "token" $security.openMode))
  (dict "name" (printf "%sREFLECTION" $prefix) "value" (toString $security.reflection))
}}
{{- $volumes := list }}
{{- $mounts := list }}
{{- if not $security.openMode }}
{{- $tls := include "swapline.tlsMountPath" . }}
{{- $env = concat $env (list
  (dict "name" (printf "%sTLS_CERT_FILE" $prefix) "value" (printf "%s/tls.crt" $tls))
  (dict "name" (printf "%sTLS_KEY_FILE" $prefix) "value" (printf "%s/tls.key" $tls))
  (dict "name" (printf "%sTLS_CA_FILE" $prefix) "value" (printf "%s/ca.crt" $tls))) }}
{{- $tlsItems := list (dict "key" "tls.crt" "path" "tls.crt") (dict "key" "tls.key" "path" "tls.key") (dict "key" "ca.crt" "path" "ca.crt") }}
{{- $volumes = append $volumes (dict "name" "tls" "secret" (dict "secretName" (include "swapline.tlsSecretName" .) "items" $tlsItems "defaultMode" 0440)) }}
{{- $mounts = append $mounts (dict "name" "tls" "mountPath" $tls "readOnly" true) }}
{{- $internal := include "swapline.internalTokenMountPath" . }}
{{- $env = append $env (dict "name" (printf "%sINTERNAL_TOKEN_FILE" $prefix) "value" (printf "%s/token" $internal)) }}
{{- $items := list (dict "key" $root.Values.auth.internalToken.secretKey "path" "token") }}
{{- $volumes = append $volumes (dict "name" "internal-token" "secret" (dict "secretName" (include "swapline.internalTokenSecretName" $root) "items" $items "defaultMode" 0440)) }}
{{- $mounts = append $mounts (dict "name" "internal-token" "mountPath" $internal "readOnly" true) }}
{{- if and .tenantTokens (include "swapline.tenantTokensConfigured" $root) }}
{{- $tenants := include "swapline.tenantTokensMountPath" . }}
{{- $env = append $env (dict "name" (printf "%sTENANT_TOKENS_FILE" $prefix) "value" (printf "%s/tokens" $tenants)) }}
{{- $items = list (dict "key" $root.Values.auth.tenantTokens.secretKey "path" "tokens") }}
{{- $volumes = append $volumes (dict "name" "tenant-tokens" "secret" (dict "secretName" (include "swapline.tenantTokensSecretName" $root) "items" $items "defaultMode" 0440)) }}
{{- $mounts = append $mounts (dict "name" "tenant-tokens" "mountPath" $tenants "readOnly" true) }}
{{- end }}
{{- end }}
{{- toYaml (dict "env" $env "volumes" $volumes "volumeMounts" $mounts) }}
{{- end }}

{{/*
The name a component's certificate is checked against by its health probes and by Prometheus: the full DNS
name of its Service, which every certificate of the component holds (the generated and cert-manager ones
list it; given ones must, as the tls values say, since the component's callers dial it).
*/}}
{{- define "swapline.tlsServerName" -}}
{{- include "swapline.serviceHost" . }}
{{- end }}

{{/*
"true" when a component's metrics endpoint speaks HTTPS: a swapline gRPC service outside open mode. Triton's
metrics are Triton's own, plain HTTP, whatever its residency sidecar serves.
*/}}
{{- define "swapline.metricsTls" -}}
{{- if and (not .root.Values.security.openMode) (ne .component "triton") (has .component (include "swapline.tlsComponents" .root | fromJsonArray)) }}true{{ end }}
{{- end }}

{{/*
The probe handler of a Python gRPC service's port (dict root, component). Open mode: the kubelet's native
gRPC probe. Under TLS the kubelet's gRPC probe cannot connect, so the container runs
services.common.health_probe: it reads the service's own SWAPLINE_<SERVICE>_ settings from the container's
env, checks the server on 127.0.0.1 at PORT (the gateway's public port; the only port of the others) against
ca.crt by the name swapline.tlsServerName, and shows the service's own certificate under mtls. Its health
call gets probes.timeoutSeconds, so raising that value gives a slow server longer.
Optional arguments, for a sidecar: envPrefix, port and probes (defaults: the component's).
*/}}
{{- define "swapline.grpcProbeHandler" -}}
{{- $values := index .root.Values .component }}
{{- $probes := default $values.probes .probes }}
{{- if .root.Values.security.openMode }}
grpc:
  port: {{ default $values.ports.grpc .port }}
{{- else }}
exec:
  command:
    - python
    - -m
    - services.common.health_probe
    - {{ default (include "swapline.envPrefix" .component) .envPrefix }}
    - --server-name
    - {{ include "swapline.tlsServerName" . }}
    - --timeout
    - {{ include "swapline.envValue" $probes.timeoutSeconds | quote }}
{{- end }}
{{- end }}
