{{/*
Objects every component has in the same shape; each takes a dict of root and component.
*/}}

{{/*
A headless Service: DNS answers with every ready pod's address, so gRPC clients (dns:/// targets,
round_robin) balance per call instead of pinning one pod through a virtual IP.
*/}}
{{- define "swapline.headlessService" -}}
{{- $values := index .root.Values .component }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "swapline.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "swapline.labels" . | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "swapline.selectorLabels" . | nindent 4 }}
  ports:
    {{- range $name, $port := $values.ports }}
    - name: {{ $name }}
      port: {{ $port }}
      targetPort: {{ $name }}
      protocol: TCP
      {{- if eq $name "grpc" }}
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
automountServiceAccountToken: {{ eq .component "exporter" }}
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
Ingress rules of one component: gRPC and HTTP API ports from this release's pods (plus clientsFrom for
public APIs), metrics ports from metricsFrom. Egress stays open: DNS, object storage, PostgreSQL.
*/}}
{{- define "swapline.networkPolicy" -}}
{{- $root := .root }}
{{- $values := index $root.Values .component }}
{{- if $root.Values.networkPolicy.enabled }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "swapline.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "swapline.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "swapline.selectorLabels" . | nindent 6 }}
  policyTypes:
    - Ingress
  ingress:
    {{- range $name, $port := $values.ports }}
    {{- if ne $name "metrics" }}
    - ports:
        - port: {{ $port }}
          protocol: TCP
      from:
        - podSelector:
            matchLabels:
              app.kubernetes.io/instance: {{ $root.Release.Name }}
              app.kubernetes.io/part-of: swapline
    {{- if has $.component (list "gateway" "advisor") }}
    - ports:
        - port: {{ $port }}
          protocol: TCP
      {{- with $root.Values.networkPolicy.clientsFrom }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}
    {{- end }}
    {{- end }}
    - ports:
        - port: {{ $values.ports.metrics }}
          protocol: TCP
      {{- with $root.Values.networkPolicy.metricsFrom }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
{{- end }}

{{/*
KEDA ScaledObject. Triggers: the component's signal (worker: pending chunks, Triton: queue versus compute
time or pending requests, or the advisor's desired replicas) and CPU where a target is set.
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
        {{- if eq $auto.signal "advisor" }}
        query: max(swapline_advisor_desired_worker_replicas{namespace="{{ $namespace }}"})
        threshold: "1"
        {{- else }}
        query: sum(swapline_gateway_chunks_pending{namespace="{{ $namespace }}"})
        threshold: {{ include "swapline.envValue" $auto.pendingChunksPerReplica | quote }}
        {{- end }}
    {{- else if eq .component "triton" }}
    {{- if eq $auto.signal "queueRatio" }}
    # Time requests wait in the queue per unit of compute time: above the threshold, compute is the bottleneck.
    - type: prometheus
      metricType: Value
      metadata:
        serverAddress: {{ $prometheus }}
        query: sum(rate(nv_inference_queue_duration_us{namespace="{{ $namespace }}"}[1m])) / clamp_min(sum(rate(nv_inference_compute_infer_duration_us{namespace="{{ $namespace }}"}[1m])), 1)
        threshold: {{ include "swapline.envValue" $auto.queueToComputeRatio | quote }}
    {{- else if eq $auto.signal "pendingRequests" }}
    - type: prometheus
      metricType: AverageValue
      metadata:
        serverAddress: {{ $prometheus }}
        query: sum(nv_inference_pending_request_count{namespace="{{ $namespace }}"})
        threshold: {{ include "swapline.envValue" $auto.pendingRequestsPerReplica | quote }}
    {{- else }}
    - type: prometheus
      metricType: AverageValue
      metadata:
        serverAddress: {{ $prometheus }}
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
signals are External/Pods metrics that prometheus-adapter must serve under the Prometheus series' names.
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
          name: swapline_gateway_chunks_pending
        target:
          type: AverageValue
          averageValue: {{ include "swapline.envValue" $auto.pendingChunksPerReplica | quote }}
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
Scrape settings shared by ServiceMonitor and PodMonitor endpoints. The exporter's job is named
swapline-exporter, its node label comes from the pod's node, and its own labels win (honorLabels), as
deploy/monitoring/swapline-alerts.yaml expects.
*/}}
{{- define "swapline.scrapeEndpoint" -}}
- port: metrics
  path: /metrics
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
    {{- include "swapline.scrapeEndpoint" (dict "component" .component "monitor" $monitor) | nindent 4 }}
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
    {{- include "swapline.scrapeEndpoint" (dict "component" .component "monitor" $monitor) | nindent 4 }}
{{- end }}
{{- end }}
