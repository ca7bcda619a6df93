{{/* The TandemCluster's name, and the prefix of everything the chart and the operator create.
Kept short: the operator appends "-attention" and "-ray-token". */}}
{{- define "tandem.fullname" -}}
{{- if contains "tandem" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-tandem" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels: fixed values only (a selector is immutable). */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: tandem
app.kubernetes.io/instance: {{ include "tandem.fullname" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tandem.labels" -}}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/part-of: tandem
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-gpu" .Chart.AppVersion) .Values.image.tag) -}}
{{- end -}}

{{- define "tandem.redisSecret" -}}
{{- if .Values.redis.existingPasswordSecret -}}
{{- .Values.redis.existingPasswordSecret -}}
{{- else if .Values.redis.enabled -}}
{{- printf "%s-redis" (include "tandem.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "tandem.pool" -}}
replicas: {{ .pool.replicas }}
min: {{ .pool.min }}
max: {{ .pool.max }}
gpus: {{ .pool.gpus }}
{{- with .pool.resources }}
resources: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .pool.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .pool.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .pool.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
