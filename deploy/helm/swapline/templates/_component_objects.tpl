{{/*
Objects every component has in the same shape; each takes a dict of root and component.
*/}}

{{/*
A headless Service: DNS answers with every ready pod's address, so gRPC clients (dns:/// targets,
round_robin) balance per call instead of pinning one pod through a virtual IP.
Optional arguments: ports (a name -> port dict; default every port of the component) and suffix (added
to the name, for a component with more than one Service).
*/}}
{{- define "swapline.headlessService" -}}
{{- $values := index .root.Values .component }}
{{- $name := include "swapline.componentName" . }}
{{- with .suffix }}
{{- $name = printf "%s-%s" $name . }}
{{- end }}
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "swapline.labels" . | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "swapline.selectorLabels" . | nindent 4 }}
  ports:
    {{- range $name, $port := default $values.ports .ports }}
    - name: {{ $name }}
      port: {{ $port }}
      targetPort: {{ $name }}
      protocol: TCP
      {{- if has $name (list "grpc" "internal" "residency") }}
      appProtocol: grpc
      {{- else }}
      appProtocol: http
      {{- end }}
    {{- end }}
{{- end }}

{{- define "swapline.serviceAccount" -}}
{{- $values := index .root.Values .component }}
{{- if $values.serviceAccount.create }}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "swapline.serviceAccountName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "swapline.labels" . | nindent 4 }}
  {{- with $values.serviceAccount.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
# Pods get no token by default; the one pod that calls the Kubernetes API mounts its own (the advisor, with
# advisor.clusterNodes.enabled).
automountServiceAccountToken: false
{{- end }}
{{- end }}

{{- define "swapline.podDisruptionBudget" -}}
{{- $values := index .root.Values .component }}
{{- if $values.pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "swapline.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "swapline.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ $values.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "swapline.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/*
NetworkPolicy parts. Each <component>-networkpolicy.yaml lists its component's flows with these: the
policy's head (it selects the component's pods and governs both directions), peers by component, and the
rules every component shares (metrics scrapes in, DNS out).
*/}}
{{- define "swapline.networkPolicyHead" -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "swapline.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "swapline.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "swapline.selectorLabels" . | nindent 6 }}
  policyTypes:
    - Ingress
    - Egress
{{- end }}

{{/* Peers: the pods of each named component of this release (dict root, components). */}}
{{- define "swapline.componentPeers" -}}
{{- $root := .root }}
{{- range .components }}
- podSelector:
    matchLabels:
      {{- include "swapline.selectorLabels" (dict "root" $root "component" .) | nindent 6 }}
{{- end }}
{{- end }}

{{/* TCP ports of a rule (a list of port numbers). */}}
{{- define "swapline.tcpPorts" -}}
{{- range . }}
- port: {{ . }}
  protocol: TCP
{{- end }}
{{- end }}

{{/* An ingress rule: the pods of `components` may reach `port` (dict root, components, port). */}}
{{- define "swapline.ingressFromComponents" -}}
- from:
    {{- include "swapline.componentPeers" . | trim | nindent 4 }}
  ports:
    {{- include "swapline.tcpPorts" (list .port) | trim | nindent 4 }}
{{- end }}

{{/* An egress rule: this pod may reach `port` of `component`'s pods (dict root, component, port). */}}
{{- define "swapline.egressToComponent" -}}
- to:
    {{- include "swapline.componentPeers" (dict "root" .root "components" (list .component)) | trim | nindent 4 }}
  ports:
    {{- include "swapline.tcpPorts" (list .port) | trim | nindent 4 }}
{{- end }}

{{/* An egress rule to peers from values (dict to, ports); no peers allows any destination on the ports. */}}
{{- define "swapline.egressToPeers" -}}
- ports:
    {{- include "swapline.tcpPorts" .ports | trim | nindent 4 }}
  {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Prometheus (networkPolicy.metricsFrom, or any source when empty) may scrape the metrics port. */}}
{{- define "swapline.metricsIngress" -}}
{{- $values := index .root.Values .component }}
- ports:
    {{- include "swapline.tcpPorts" (list $values.ports.metrics) | trim | nindent 4 }}
  {{- with .root.Values.networkPolicy.metricsFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Name lookups against the cluster DNS (the root context). */}}
{{- define "swapline.dnsEgress" -}}
- to:
    {{- toYaml (required "networkPolicy.dnsTo must name the cluster DNS" .Values.networkPolicy.dnsTo) | nindent 4 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end }}

{{/*
A component's TLS Secret generated by the chart (no Secret in values, no cert-manager), signed by the kept
private CA. An existing one signed by that CA is kept as it is, so upgrades do not change certificates.
*/}}
{{- define "swapline.generatedTlsSecret" -}}
{{- if and (not .root.Values.security.openMode) (eq (include "swapline.tlsSource" .) "generated") }}
{{- $root := .root }}
{{- include "swapline.generatedCa" $root }}
{{- $ca := $root.swaplineGeneratedCa }}
{{- $caPem := $ca.Cert | b64enc }}
{{- $name := include "swapline.tlsSecretName" . }}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace $name }}
{{- $data := dict }}
{{- if and (eq (dig "data" "ca.crt" "" $existing) $caPem) (dig "data" "tls.crt" "" $existing) (dig "data" "tls.key" "" $existing) }}
{{- $data = pick $existing.data "tls.crt" "tls.key" "ca.crt" }}
{{- else }}
{{- $dnsNames := include "swapline.tlsDnsNames" . | fromJsonArray }}
{{- $ips := include "swapline.tlsIpAddresses" . | fromJsonArray }}
{{- $cert := genSignedCertWithKey (include "swapline.componentName" .) $ips $dnsNames (int $root.Values.tls.generatedValidityDays) $ca (genPrivateKey "ecdsa") }}
{{- $data = dict "tls.crt" ($cert.Cert | b64enc) "tls.key" ($cert.Key | b64enc) "ca.crt" $caPem }}
{{- end }}
apiVersion: v1
kind: Secret
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "swapline.labels" . | nindent 4 }}
type: kubernetes.io/tls
data:
  {{- toYaml $data | nindent 2 }}
{{- end }}
{{- end }}

{{/*
A component's cert-manager Certificate: server and client usages (mtls uses the same pair both ways),
every name of the component's Services, and a new key on each renewal.
*/}}
{{- define "swapline.certificate" -}}
{{- if and (not .root.Values.security.openMode) (eq (include "swapline.tlsSource" .) "certManager") }}
{{- $manager := .root.Values.tls.certManager }}
{{- $ips := include "swapline.tlsIpAddresses" . | fromJsonArray }}
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: {{ include "swapline.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "swapline.labels" . | nindent 4 }}
spec:
  secretName: {{ include "swapline.tlsSecretName" . }}
  secretTemplate:
    labels:
      {{- include "swapline.selectorLabels" . | nindent 6 }}
      app.kubernetes.io/part-of: swapline
  commonName: {{ include "swapline.componentName" . }}
  dnsNames:
    {{- include "swapline.tlsDnsNames" . | fromJsonArray | toYaml | nindent 4 }}
  {{- with $ips }}
  ipAddresses:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  duration: {{ $manager.duration }}
  renewBefore: {{ $manager.renewBefore }}
  privateKey:
    algorithm: {{ $manager.privateKeyAlgorithm }}
    size: {{ ternary 256 2048 (eq $manager.privateKeyAlgorithm "ECDSA") }}
    rotationPolicy: Always
  usages:
    - digital signature
    - key encipherment
    - server auth
    - client auth
  issuerRef:
    {{- toYaml $manager.issuerRef | nindent 4 }}
{{- end }}
{{- end }}

{{/*
The workers' backlog as PromQL: the open chunks (pending and leased) of the shared job store. Every gateway
replica exports the whole store's counts, so the replicas' series are collapsed with max per state before
the states are summed: the backlog counts once however many gateways run. The argument is the label
matchers of the series (e.g. namespace="media", or prometheus-adapter's <<.LabelMatchers>>).
*/}}
{{- define "swapline.openChunksQuery" -}}
sum(max by (state) (swapline_gateway_chunks_open{ {{- . -}} }))
{{- end }}

{{/*
KEDA ScaledObject. Triggers: the component's signal (worker: the open backlog, Triton: queue versus compute
time or pending requests, or the advisor's desired replicas) and CPU where a target is set. An empty answer
from Prometheus is an error (ignoreNullValues false), not a zero that keeps the component at minReplicas.
*/}}
{{- define "swapline.scaledObject" -}}
{{- $root := .root }}
{{- $values := index $root.Values .component }}
{{- $auto := $values.autoscaling }}
{{- if and $auto.enabled (eq $root.Values.autoscaling.engine "keda") }}
{{- $prometheus := $root.Values.autoscaling.keda.prometheusServerAddress }}
{{- $namespace := $root.Release.Namespace }}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ include "swapline.componentName" . }}
  namespace: {{ $namespace }}
  labels:
    {{- include "swapline.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "swapline.componentName" . }}
  minReplicaCount: {{ $auto.minReplicas }}
  maxReplicaCount: {{ $auto.maxReplicas }}
  pollingInterval: {{ $root.Values.autoscaling.keda.pollingInterval }}
  cooldownPeriod: {{ $root.Values.autoscaling.keda.cooldownPeriod }}
  triggers:
    {{- if eq .component "worker" }}
    - type: prometheus
      metricType: AverageValue
      metadata:
        serverAddress: {{ $prometheus }}
        ignoreNullValues: "false"
        {{- if eq $auto.signal "advisor" }}
        query: max(swapline_advisor_desired_worker_replicas{namespace="{{ $namespace }}"})
        threshold: "1"
        {{- else }}
        query: {{ include "swapline.openChunksQuery" (printf "namespace=%q" $namespace) }}
        threshold: {{ include "swapline.envValue" $auto.openChunksPerReplica | quote }}
        {{- end }}
    {{- else if eq .component "triton" }}
    {{- if eq $auto.signal "queueRatio" }}
    # Time requests wait in the queue per unit of compute time: above the threshold, compute is the bottleneck.
    - type: prometheus
      metricType: Value
      metadata:
        serverAddress: {{ $prometheus }}
        ignoreNullValues: "false"
        query: sum(rate(nv_inference_queue_duration_us{namespace="{{ $namespace }}"}[1m])) / clamp_min(sum(rate(nv_inference_compute_infer_duration_us{namespace="{{ $namespace }}"}[1m])), 1)
        threshold: {{ include "swapline.envValue" $auto.queueToComputeRatio | quote }}
    {{- else if eq $auto.signal "pendingRequests" }}
    - type: prometheus
      metricType: AverageValue
      metadata:
        serverAddress: {{ $prometheus }}
        ignoreNullValues: "false"
        query: sum(nv_inference_pending_request_count{namespace="{{ $namespace }}"})
        threshold: {{ include "swapline.envValue" $auto.pendingRequestsPerReplica | quote }}
    {{- else }}
    - type: prometheus
      metricType: AverageValue
      metadata:
        serverAddress: {{ $prometheus }}
        ignoreNullValues: "false"
        query: max(swapline_advisor_desired_triton_replicas{namespace="{{ $namespace }}"})
        threshold: "1"
    {{- end }}
    {{- end }}
    {{- if gt (int $auto.targetCPUUtilizationPercentage) 0 }}
    - type: cpu
      metricType: Utilization
      metadata:
        value: {{ include "swapline.envValue" $auto.targetCPUUtilizationPercentage | quote }}
    {{- end }}
{{- end }}
{{- end }}

{{/*
autoscaling/v2 HPA for clusters without KEDA. CPU comes from metrics-server; the worker's and Triton's
signals are External/Pods metrics that prometheus-adapter serves under the Prometheus series' names, by
the rules of prometheus-adapter-configmap.yaml.
*/}}
{{- define "swapline.horizontalPodAutoscaler" -}}
{{- $root := .root }}
{{- $values := index $root.Values .component }}
{{- $auto := $values.autoscaling }}
{{- if and $auto.enabled (eq $root.Values.autoscaling.engine "hpa") }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "swapline.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "swapline.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "swapline.componentName" . }}
  minReplicas: {{ $auto.minReplicas }}
  maxReplicas: {{ $auto.maxReplicas }}
  metrics:
    {{- if eq .component "worker" }}
    - type: External
      external:
        metric:
          {{- if eq $auto.signal "advisor" }}
          name: swapline_advisor_desired_worker_replicas
        target:
          type: AverageValue
          averageValue: "1"
          {{- else }}
          name: swapline_gateway_chunks_open
        target:
          type: AverageValue
          averageValue: {{ include "swapline.envValue" $auto.openChunksPerReplica | quote }}
          {{- end }}
    {{- else if eq .component "triton" }}
    {{- if eq $auto.signal "advisor" }}
    - type: External
      external:
        metric:
          name: swapline_advisor_desired_triton_replicas
        target:
          type: AverageValue
          averageValue: "1"
    {{- else }}
    - type: Pods
      pods:
        metric:
          name: nv_inference_pending_request_count
        target:
          type: AverageValue
          averageValue: {{ include "swapline.envValue" $auto.pendingRequestsPerReplica | quote }}
    {{- end }}
    {{- end }}
    {{- if gt (int $auto.targetCPUUtilizationPercentage) 0 }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $auto.targetCPUUtilizationPercentage }}
    {{- end }}
{{- end }}
{{- end }}

{{/*
Scrape settings shared by ServiceMonitor and PodMonitor endpoints (dict root, component, monitor). The
swapline gRPC services serve their metrics over HTTPS with their own certificate outside open mode, so
Prometheus verifies it against ca.crt of the component's TLS Secret by the name the certificate holds
(metrics need no client certificate, under mtls too); the exporter and Triton serve plain HTTP. The
exporter's job is named swapline-exporter, its node label comes from the pod's node, and its own labels win
(honorLabels), as deploy/monitoring/swapline-alerts.yaml expects.
*/}}
{{- define "swapline.scrapeEndpoint" -}}
- port: metrics
  path: /metrics
  {{- if include "swapline.metricsTls" . }}
  scheme: https
  tlsConfig:
    ca:
      secret:
        name: {{ include "swapline.tlsSecretName" . }}
        key: ca.crt
    serverName: {{ include "swapline.tlsServerName" . }}
  {{- else }}
  scheme: http
  {{- end }}
  {{- if eq .component "exporter" }}
  interval: {{ .monitor.exporterInterval }}
  honorLabels: true
  relabelings:
    - targetLabel: job
      replacement: swapline-exporter
    - sourceLabels: [__meta_kubernetes_pod_node_name]
      targetLabel: node
  {{- else }}
  interval: {{ .monitor.interval }}
  {{- end }}
{{- end }}

{{- define "swapline.serviceMonitor" -}}
{{- $monitor := .root.Values.monitoring.serviceMonitor }}
{{- if $monitor.enabled }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "swapline.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "swapline.labels" . | nindent 4 }}
    {{- with $monitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "swapline.selectorLabels" . | nindent 6 }}
  namespaceSelector:
    matchNames:
      - {{ .root.Release.Namespace }}
  endpoints:
    {{- include "swapline.scrapeEndpoint" (dict "root" .root "component" .component "monitor" $monitor) | nindent 4 }}
{{- end }}
{{- end }}

{{- define "swapline.podMonitor" -}}
{{- $monitor := .root.Values.monitoring.podMonitor }}
{{- if $monitor.enabled }}
apiVersion: monitoring.coreos.com/v1
kind: PodMonitor
metadata:
  name: {{ include "swapline.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "swapline.labels" . | nindent 4 }}
    {{- with $monitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "swapline.selectorLabels" . | nindent 6 }}
  namespaceSelector:
    matchNames:
      - {{ .root.Release.Namespace }}
  podMetricsEndpoints:
    {{- include "swapline.scrapeEndpoint" (dict "root" .root "component" .component "monitor" $monitor) | nindent 4 }}
{{- end }}
{{- end }}
