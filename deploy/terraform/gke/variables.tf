variable "project_id" {
  description = "Google Cloud project that holds the cluster."
  type        = string
}

variable "location" {
  description = "Region or zone of the existing GKE cluster (the node pool is created there)."
  type        = string
}

variable "cluster_name" {
  description = "Name of an existing GKE cluster (Standard mode) to add the GPU node pool to."
  type        = string
}

variable "node_locations" {
  description = "Zones for the GPU nodes (where the accelerator is offered); empty = the cluster's zones."
  type        = list(string)
  default     = []
}

variable "machine_type" {
  description = "Machine type of the GPU nodes (g2-standard-8 carries one L4)."
  type        = string
  default     = "g2-standard-8"
}

variable "accelerator_type" {
  description = "GPU type attached to each node (nvidia-l4, nvidia-tesla-a100, nvidia-h100-80gb, ...)."
  type        = string
  default     = "nvidia-l4"
}

variable "accelerator_count" {
  description = "GPUs per node; the chart asks for one per replica."
  type        = number
  default     = 1
}

variable "min_nodes" {
  description = "Fewest GPU nodes per zone the cluster autoscaler keeps."
  type        = number
  default     = 1
}

variable "max_nodes" {
  description = "Most GPU nodes per zone the cluster autoscaler adds (KEDA's maxReplicas should fit)."
  type        = number
  default     = 4
}

variable "spot" {
  description = "Use Spot VMs for the GPU nodes (cheaper; preempted nodes drain through the chart's preStop)."
  type        = bool
  default     = false
}

variable "namespace" {
  description = "Kubernetes namespace for the release (created if missing)."
  type        = string
  default     = "inferflux"
}

variable "chart_path" {
  description = "Path to the InferFlux chart (this repository's deploy/helm/inferflux) or a packaged .tgz."
  type        = string
  default     = "../../helm/inferflux"
}

variable "image_tag" {
  description = "InferFlux CUDA image tag (deploy/docker/Dockerfile.cuda)."
  type        = string
  default     = "0.1.0-cuda"
}

variable "model_name" {
  description = "Store name of the model every replica serves."
  type        = string
}

variable "model_source" {
  description = "What `inferctl pull` fetches: hf://ORG/REPO[/FILE], ollama://NAME:TAG or a path."
  type        = string
}

variable "master_key" {
  description = "INFERFLUX_MASTER_KEY (`inferctl admin secrets genkey`); kept in a Kubernetes Secret."
  type        = string
  sensitive   = true
}

variable "redis_url" {
  description = "Redis for shared keys and limits (state.backend redis), e.g. a Memorystore instance's URL."
  type        = string
  sensitive   = true
}

variable "extra_values" {
  description = "More chart values as YAML documents (merged after this module's own)."
  type        = list(string)
  default     = []
}
