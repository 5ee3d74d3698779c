{{/* Names and labels shared by every object. */}}
{{- define "inferflux.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "inferflux.servedName" -}}
{{- default .Values.model.name .Values.model.servedModelName -}}
{{- end -}}

{{- define "inferflux.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "inferflux.labels" -}}
{{ include "inferflux.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* What the Gateway API inference extension's InferencePool selects and llm-d's endpoint picker reads. */}}
{{- define "inferflux.inferenceLabels" -}}
llm-d.ai/inferenceServing: "true"
llm-d.ai/model: {{ include "inferflux.servedName" . | replace ":" "-" | replace "/" "-" | trunc 63 | quote }}
llm-d.ai/role: both
{{- end -}}

{{- define "inferflux.secretName" -}}
{{- default (include "inferflux.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* SIGTERM-to-kill budget: the preStop sleep, the server's drain, and 10 s to flush and exit. */}}
{{- define "inferflux.gracePeriod" -}}
{{- add (int .Values.lifecycle.preStopSleepSeconds) (int (ceil .Values.config.server.drain_seconds)) 10 -}}
{{- end -}}
