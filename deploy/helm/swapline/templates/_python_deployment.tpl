{{/*
The Deployment of one Python gRPC service (`python -m services.<component>` on the swapline image).
Arguments (dict): root, component, env (list of EnvVar dicts the component adds), gpuEnv (list of EnvVar
dicts added only when the component's gpu.count is above 0), volumes, volumeMounts (lists), strategy (dict,
optional), podAnnotations (dict, optional), tenantTokens (bool: mount the public API's tenant tokens),
frameMemory ("sends" or "takes", optional: the component streams frames to or from the others, and with
frameMemory.enabled mounts the node's frame memory directory and is told where it is, and a sender its budget).

A component with a `gpu` block and gpu.count above 0 runs on GPU nodes as Triton does: it asks for that many
nvidia.com/gpu, requires a node with GPU feature discovery's nvidia.com/gpu.product label (one of
gpu.products when given, unless affinity is set), tolerates the nvidia.com/gpu taint, and gets
NVIDIA_DRIVER_CAPABILITIES=compute,utility,video: NVDEC and NVENC need the driver's video libraries
(libnvcuvid, libnvidia-encode), which the container runtime mounts only with the `video` capability.

The server env (HOST, PORT, METRICS_PORT, DRAIN_SECONDS, MAX_MESSAGE_BYTES, MAX_CONNECTION_AGE_SECONDS,
LOG_LEVEL, and the security fields of swapline.securityParts) comes from ServerSettings, which every
service's settings class extends; `settings` values become further SWAPLINE_<COMPONENT>_<FIELD> variables,
and may not repeat one the chart sets. Every port in the component's `ports` is a container port.
*/}}
{{- define "swapline.pythonDeployment" -}}
{{- $root := .root }}
{{- $component := .component }}
{{- $values := index $root.Values $component }}
{{- $prefix := include "swapline.envPrefix" $component }}
{{- $env := list
  (dict "name" (printf "%sHOST" $prefix) "value" "0.0.0.0")
  (dict "name" (printf "%sPORT" $prefix) "value" (include "swapline.envValue" $values.ports.grpc))
  (dict "name" (printf "%sMETRICS_PORT" $prefix) "value" (include "swapline.envValue" $values.ports.metrics))
  (dict "name" (printf "%sDRAIN_SECONDS" $prefix) "value" (include "swapline.envValue" $values.drainSeconds))
  (dict "name" (printf "%sMAX_MESSAGE_BYTES" $prefix) "value" (include "swapline.envValue" $root.Values.grpc.maxMessageBytes))
  (dict "name" (printf "%sMAX_CONNECTION_AGE_SECONDS" $prefix) "value" (include "swapline.envValue" $root.Values.grpc.maxConnectionAgeSeconds))
  (dict "name" (printf "%sLOG_LEVEL" $prefix) "value" $values.logLevel)
}}
{{- $security := include "swapline.securityParts" (dict "root" $root "component" $component "tenantTokens" .tenantTokens) | fromYaml }}
{{- $env = concat $env $security.env (default (list) .env) }}
{{- $frameVolumes := list }}
{{- $frameMounts := list }}
{{- if and .frameMemory $root.Values.frameMemory.enabled }}
{{- $frame := $root.Values.frameMemory }}
{{- $env = append $env (dict "name" (printf "%sFRAME_MEMORY_DIR" $prefix) "value" $frame.mountPath) }}
{{- if eq .frameMemory "sends" }}
{{- $env = append $env (dict "name" (printf "%sFRAME_MEMORY_BYTES" $prefix) "value" (include "swapline.envValue" $frame.maxBytes)) }}
{{- end }}
{{- $frameVolumes = list (dict "name" "frame-memory" "hostPath" (dict "path" $frame.hostPath "type" "Directory")) }}
{{- $frameMounts = list (dict "name" "frame-memory" "mountPath" $frame.mountPath) }}
{{- end }}
{{- $gpuCount := dig "gpu" "count" 0 $values | int }}
{{- $resources := deepCopy $values.resources }}
{{- $tolerations := $values.tolerations }}
{{- if gt $gpuCount 0 }}
{{- $_ := set $resources.limits "nvidia.com/gpu" $gpuCount }}
{{- $_ := set $resources.requests "nvidia.com/gpu" $gpuCount }}
{{- $env = concat $env (list (dict "name" "NVIDIA_DRIVER_CAPABILITIES" "value" "compute,utility,video")) (default (list) .gpuEnv) }}
{{- $gpuTaint := dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule" }}
{{- if not (has $gpuTaint $tolerations) }}
{{- $tolerations = append $tolerations $gpuTaint }}
{{- end }}
{{- end }}
{{- $chartSet := list }}
{{- range $env }}
{{- $chartSet = append $chartSet .name }}
{{- end }}
{{- range $field, $value := $values.settings }}
{{- $name := printf "%s%s" $prefix (upper $field) }}
{{- if has $name $chartSet }}
{{- fail (printf "%s.settings.%s: the chart sets %s itself from its own values" $component $field $name) }}
{{- end }}
{{- $env = append $env (dict "name" $name "value" (include "swapline.envValue" $value)) }}
{{- end }}
{{- $env = concat $env $values.extraEnv }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "swapline.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "swapline.labels" . | nindent 4 }}
spec:
  {{- if not $values.autoscaling.enabled }}
  replicas: {{ $values.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  {{- with .strategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "swapline.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "swapline.labels" . | nindent 8 }}
        {{- with $values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $annotations := merge (dict) (default (dict) .podAnnotations) $values.podAnnotations }}
      {{- with $annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "swapline.serviceAccountName" . }}
      # The services call no Kubernetes API.
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $values.podSecurityContext | nindent 8 }}
      # Longer than the preStop sleep plus the server's drain, so in-flight calls finish before SIGKILL.
      terminationGracePeriodSeconds: {{ include "swapline.terminationGracePeriod" . }}
      {{- with $values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $values.affinity }}
      affinity:
        {{- toYaml $values.affinity | nindent 8 }}
      {{- else if gt $gpuCount 0 }}
      affinity:
        {{- include "swapline.gpuNodeAffinity" $values.gpu.products | nindent 8 }}
      {{- end }}
      {{- with $values.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $component }}
          image: {{ include "swapline.image" . | quote }}
          imagePullPolicy: {{ include "swapline.imagePullPolicy" . }}
          # The image's ENTRYPOINT is ["python", "-m"]: the argument picks the service.
          args: ["services.{{ $component }}"]
          ports:
            {{- range $name, $port := $values.ports }}
            - name: {{ $name }}
              containerPort: {{ $port }}
              protocol: TCP
            {{- end }}
          env:
            {{- toYaml $env | nindent 12 }}
          # grpc.health.v1 checks (the empty service name is the server overall): the kubelet's own gRPC probe where
          # the port speaks plaintext, services.common.health_probe over TLS (the kubelet cannot speak TLS).
          {{- $probe := include "swapline.grpcProbeHandler" . | trim }}
          startupProbe:
            {{- $probe | nindent 12 }}
            periodSeconds: 2
            timeoutSeconds: {{ $values.probes.timeoutSeconds }}
            failureThreshold: {{ $values.probes.startupFailureThreshold }}
          livenessProbe:
            {{- $probe | nindent 12 }}
            periodSeconds: {{ $values.probes.periodSeconds }}
            timeoutSeconds: {{ $values.probes.timeoutSeconds }}
            failureThreshold: {{ $values.probes.failureThreshold }}
          readinessProbe:
            {{- $probe | nindent 12 }}
            periodSeconds: {{ $values.probes.periodSeconds }}
            timeoutSeconds: {{ $values.probes.timeoutSeconds }}
            failureThreshold: {{ $values.probes.failureThreshold }}
          lifecycle:
            {{- include "swapline.preStop" . | nindent 12 }}
          resources:
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- toYaml $values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- with concat (default (list) .volumeMounts) $frameMounts $security.volumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        # The root filesystem is read-only; temporary files go here.
        - name: tmp
          emptyDir:
            sizeLimit: 1Gi
        {{- with concat (default (list) .volumes) $frameVolumes $security.volumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end }}
