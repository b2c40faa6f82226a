{{/*
Names. Kubernetes names of most kinds are DNS labels: at most 63 characters, so every name is
truncated to 63 and loses a trailing "-".
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "taas.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or just <release> when it already contains the chart name, or fullnameOverride. */}}
{{- define "taas.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Component names: <fullname>-<component>, truncated to 63. */}}
{{- define "taas.operator.fullname" -}}
{{- printf "%s-operator" (include "taas.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "taas.gateway.fullname" -}}
{{- printf "%s-gateway" (include "taas.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The ConfigMap the operator writes the gateway's routes into (the chart never creates it). */}}
{{- define "taas.routesConfigMap" -}}
{{- if .Values.operator.routesConfigMap -}}
{{- .Values.operator.routesConfigMap -}}
{{- else -}}
{{- printf "%s-routes" (include "taas.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "taas.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "taas.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "taas.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "taas.gateway.fullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the gateway's certificate, or "" for a self-signed one per pod. */}}
{{- define "taas.gateway.tlsSecretName" -}}
{{- if .Values.gateway.tls.secretName -}}
{{- .Values.gateway.tls.secretName -}}
{{- else if .Values.gateway.tls.certManager.enabled -}}
{{- printf "%s-tls" (include "taas.gateway.fullname" .) | trunc 253 -}}
{{- end -}}
{{- end -}}

{{/* The image, by digest when one is given; the same for operator, gateway and relay pods. */}}
{{- define "taas.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* helm.sh/chart label value. */}}
{{- define "taas.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "taas.labels" -}}
helm.sh/chart: {{ include "taas.chart" . }}
app.kubernetes.io/name: {{ include "taas.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ default .Chart.AppVersion .Values.image.tag | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: taas
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of a component: include "taas.selectorLabels" (dict "ctx" $ "component" "gateway"). */}}
{{- define "taas.selectorLabels" -}}
app.kubernetes.io/name: {{ include "taas.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of a component's objects. */}}
{{- define "taas.componentLabels" -}}
{{ include "taas.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The environment every TAAS process gets: log format and filter. */}}
{{- define "taas.logEnv" -}}
- name: TAAS_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- end -}}

{{/* An HTTP probe on the metrics port: include "taas.probe" (dict "probe" .Values.x.livenessProbe "path" "/healthz"). */}}
{{- define "taas.probe" -}}
httpGet:
  path: {{ .path }}
  port: metrics
  scheme: HTTP
initialDelaySeconds: {{ .probe.initialDelaySeconds }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
successThreshold: 1
failureThreshold: {{ .probe.failureThreshold }}
{{- end -}}

{{/* Fails rendering on combinations of values the schema cannot express. */}}
{{- define "taas.validate" -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection.enabled) -}}
{{- fail (printf "operator.replicas is %d but operator.leaderElection.enabled is false: several operators would reconcile the same labels at once. Set operator.leaderElection.enabled=true, or operator.replicas=1." (int .Values.operator.replicas)) -}}
{{- end -}}
{{- if and (gt (int .Values.gateway.replicas) 1) (not (include "taas.gateway.tlsSecretName" .)) -}}
{{- fail (printf "gateway.replicas is %d but no shared certificate is configured: each gateway pod would generate its own self-signed one, and clients would see a different certificate on every connection. Set gateway.tls.secretName (an existing kubernetes.io/tls Secret) or gateway.tls.certManager.enabled=true with gateway.tls.certManager.issuerRef.name, or gateway.replicas=1." (int .Values.gateway.replicas)) -}}
{{- end -}}
{{- $relayReplicas := int ((.Values.relay | default dict).replicas | default 1) -}}
{{- if and (gt $relayReplicas 1) (not (include "taas.edge.enabled" .)) -}}
{{- fail (printf "relay.replicas is %d but edge.enabled is false: several relay replicas need the cluster edge (the gateway offers a hidden server's rendezvous connection to every replica; a label's own Service would hand it to one that does not hold the registration). Set edge.enabled=true, or relay.replicas=1." $relayReplicas) -}}
{{- end -}}
{{- if and .Values.gateway.tls.certManager.enabled (not .Values.gateway.tls.certManager.issuerRef.name) -}}
{{- fail "gateway.tls.certManager.enabled is true but gateway.tls.certManager.issuerRef.name is empty: name the cert-manager Issuer or ClusterIssuer that signs the gateway's certificate." -}}
{{- end -}}
{{- if and .Values.gateway.service.loadBalancerClass (ne .Values.gateway.service.type "LoadBalancer") -}}
{{- fail "gateway.service.loadBalancerClass is only valid with gateway.service.type=LoadBalancer." -}}
{{- end -}}
{{- if and .Values.gateway.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.gateway.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.gateway.podDisruptionBudget.maxUnavailable)) -}}
{{- fail "gateway.podDisruptionBudget: set either minAvailable or maxUnavailable, not both (set the other to null)." -}}
{{- end -}}
{{- if eq (int .Values.networkPolicy.relayControlPort) (int .Values.networkPolicy.relayMetricsPort) -}}
{{- fail "networkPolicy.relayControlPort and networkPolicy.relayMetricsPort must differ." -}}
{{- end -}}
{{- /* Before Kubernetes 1.22 (no endPort) the relay policy lists the relay's own ports one by one (networkpolicy.yaml). */ -}}
{{- if eq (int .Values.gateway.metricsPort) 8443 -}}
{{- fail "gateway.metricsPort cannot be 8443: the gateway's HTTPS port." -}}
{{- end -}}
{{- if include "taas.edge.enabled" . -}}
{{- $shared := int (include "taas.edge.sharedPort" .) -}}
{{- $first := int (include "taas.edge.first" .) -}}
{{- $last := int (include "taas.edge.last" .) -}}
{{- if gt $last 65535 -}}
{{- fail (printf "edge.rendezvousPorts: first %d and count %d end past port 65535." $first (int (include "taas.edge.count" .))) -}}
{{- end -}}
{{- if and (ge $shared $first) (le $shared $last) -}}
{{- fail (printf "edge.sharedPort %d is inside edge.rendezvousPorts (%d-%d): choose a port outside the range." $shared $first $last) -}}
{{- end -}}
{{- range $p := list 8443 (int .Values.gateway.metricsPort) -}}
{{- if or (eq $p $shared) (and (ge $p $first) (le $p $last)) -}}
{{- fail (printf "edge.sharedPort and edge.rendezvousPorts (%d, %d-%d) must not include the gateway container's port %d (HTTPS 8443, gateway.metricsPort)." $shared $first $last $p) -}}
{{- end -}}
{{- end -}}
{{- if eq .Values.gateway.service.type "NodePort" -}}
{{- if or (lt $shared 30000) (gt $shared 32767) (lt $first 30000) (gt $last 32767) -}}
{{- fail (printf "gateway.service.type is NodePort, so the edge's ports are node ports too (port == targetPort == nodePort, one number everywhere), and node ports are 30000-32767: edge.sharedPort is %d and edge.rendezvousPorts are %d-%d. Move them into 30000-32767 (e.g. edge.sharedPort=30444, edge.rendezvousPorts.first=31000), or set edge.enabled=false." $shared $first $last) -}}
{{- end -}}
{{- with .Values.gateway.service.nodePort -}}
{{- if or (eq (int .) $shared) (and (ge (int .) $first) (le (int .) $last)) -}}
{{- fail (printf "gateway.service.nodePort %d is one of the edge's ports (edge.sharedPort %d, edge.rendezvousPorts %d-%d)." (int .) $shared $first $last) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the install's gateway secret (key `secret`): an existing one, or the chart's. */}}
{{- define "taas.gatewayAuth.secretName" -}}
{{- $existing := include "taas.gatewayAuth.existingSecret" . -}}
{{- if $existing -}}
{{- $existing -}}
{{- else -}}
{{- printf "%s-gateway-auth" (include "taas.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
The values added with issue 13, read so that `helm upgrade --reuse-values` from a release
made before them (whose stored values lack these keys) still renders: missing means default.
*/}}
{{- define "taas.gatewayAuth.existingSecret" -}}
{{- (.Values.gatewayAuth | default dict).existingSecret | default "" -}}
{{- end -}}

{{/*
The cluster edge (issue 15.3). A release made before these values has no `edge` key under
--reuse-values: missing means off, so such an upgrade renders what it rendered before.
"true" or "" (include returns a string).
*/}}
{{- define "taas.edge.enabled" -}}
{{- if (.Values.edge | default dict).enabled -}}true{{- end -}}
{{- end -}}

{{- define "taas.edge.sharedPort" -}}
{{- (.Values.edge | default dict).sharedPort | default 9443 | int -}}
{{- end -}}

{{- define "taas.edge.first" -}}
{{- ((.Values.edge | default dict).rendezvousPorts | default dict).first | default 20000 | int -}}
{{- end -}}

{{- define "taas.edge.count" -}}
{{- ((.Values.edge | default dict).rendezvousPorts | default dict).count | default 256 | int -}}
{{- end -}}

{{- define "taas.edge.last" -}}
{{- sub (add (int (include "taas.edge.first" .)) (int (include "taas.edge.count" .))) 1 -}}
{{- end -}}

{{/* The relays' edge port (operator/src/names.rs: EDGE_PORT), where only gateways connect. */}}
{{- define "taas.edge.relayPort" -}}
21001
{{- end -}}

{{- define "taas.clusterDomain" -}}
{{- .Values.clusterDomain | default "cluster.local" -}}
{{- end -}}

{{/* Where the gateway and the operator mount it. */}}
{{- define "taas.gatewayAuth.file" -}}
/etc/taas/gateway-auth/secret
{{- end -}}

{{/* The volume of the gateway secret (gateway and operator pods; readable by fsGroup 65532). */}}
{{- define "taas.gatewayAuth.volume" -}}
- name: gateway-auth
  secret:
    secretName: {{ include "taas.gatewayAuth.secretName" . }}
    defaultMode: 0440
    items:
      - key: secret
        path: secret
{{- end -}}

{{/* The ConfigMap holding the operator's policy file (labelPolicy, servicePolicy). */}}
{{- define "taas.policyConfigMap" -}}
{{- printf "%s-operator-policy" (include "taas.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The operator's policy file (operator/src/policy.rs): what each namespace's labels may claim and ask for. */}}
{{- define "taas.policyFile" -}}
{{- $labels := (.Values.labelPolicy | default dict).namespaces | default dict -}}
{{- $services := .Values.servicePolicy | default dict -}}
labels:
  {{- toYaml $labels | nindent 2 }}
services:
  default:
    {{- toYaml ($services.default | default dict) | nindent 4 }}
  namespaces:
    {{- toYaml ($services.namespaces | default dict) | nindent 4 }}
{{- end -}}
