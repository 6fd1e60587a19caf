{{/*
Labels every object of the chart carries. Kept free of the chart version and of Helm's release
metadata, so the plain manifests rendered from the chart stay the same from release to release.
*/}}
{{- define "weft.labels" -}}
app.kubernetes.io/part-of: weft
{{- end }}

{{/* The image of a component: (dict "root" $ "image" .Values.controller.image). */}}
{{- define "weft.image" -}}
{{ .image.repository }}:{{ .image.tag | default .root.Values.image.tag }}
{{- end }}

{{/*
A CRD as Istio ships them: every version served, no conversion (the versions share one schema),
v1 stored, the status subresource. Takes a dict: group, kind, plural, singular, shortNames (list),
categories (list), versions (list, "v1" first), schema (the openAPIV3Schema, YAML text).
*/}}
{{- define "weft.crd" -}}
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {{ .plural }}.{{ .group }}
  annotations:
    # Uninstalling the chart must not delete every VirtualService, policy, ... of the cluster.
    helm.sh/resource-policy: keep
  {{- with .annotations }}
    {{- toYaml . | nindent 4 }}
  {{- end }}
  labels:
    {{- include "weft.labels" .root | nindent 4 }}
spec:
  group: {{ .group }}
  names:
    kind: {{ .kind }}
    listKind: {{ .kind }}List
    plural: {{ .plural }}
    singular: {{ .singular }}
    {{- with .shortNames }}
    shortNames:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .categories }}
    categories:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  scope: Namespaced
  versions:
  {{- range $i, $version := .versions }}
    - name: {{ $version }}
      served: true
      storage: {{ eq $version "v1" }}
      subresources:
        status: {}
      schema:
        openAPIV3Schema:
          {{- $.schema | nindent 10 }}
  {{- end }}
{{- end }}

{{/* A label selector: matchLabels, as Istio's selector fields. */}}
{{- define "weft.schema.selector" -}}
type: object
properties:
  matchLabels:
    type: object
    additionalProperties:
      type: string
{{- end }}

{{/* A policy's target: a Gateway API style object reference (targetRef, items of targetRefs). */}}
{{- define "weft.schema.targetRef" -}}
type: object
required: [kind, name]
properties:
  group:
    type: string
  kind:
    type: string
  name:
    type: string
  namespace:
    type: string
{{- end }}
