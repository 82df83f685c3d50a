{{/*
Where the gateway reads each job's GPU trend (root context), as YAML: source (a gpu_trend_source of
services/gateway/settings.py), url, and chartSets (whether the chart sets the gateway's variables). The chart
points the gateway at Prometheus when the exporter runs and Prometheus scrapes it: a monitor of this chart, or
monitoring.prometheus.url naming a Prometheus of the user's own configuration. gateway.settings.gpu_trend_source,
where set, decides instead, and then the chart sets nothing. The gateway's Deployment and its NetworkPolicy's
egress to Prometheus both follow this one answer.
*/}}
{{- define "swapline.gatewayGpuTrends" -}}
{{- $settings := .Values.gateway.settings }}
{{- $monitored := or .Values.monitoring.serviceMonitor.enabled .Values.monitoring.podMonitor.enabled }}
{{- $url := default .Values.autoscaling.keda.prometheusServerAddress .Values.monitoring.prometheus.url }}
{{- if hasKey $settings "gpu_trend_source" }}
source: {{ toString (index $settings "gpu_trend_source") | quote }}
chartSets: false
{{- else if and .Values.exporter.enabled (or $monitored .Values.monitoring.prometheus.url) }}
source: prometheus
url: {{ $url | quote }}
chartSets: true
{{- else }}
source: none
chartSets: false
{{- end }}
{{- end }}
