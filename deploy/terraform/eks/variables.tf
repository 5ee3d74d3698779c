variable "region" {
  description = "AWS region of the existing EKS cluster."
  type        = string
}

variable "cluster_name" {
  description = "Name of an existing EKS cluster to add the GPU managed node group to."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the GPU nodes (in zones that offer the instance type)."
  type        = list(string)
}

variable "node_role_arn" {
  description = "IAM role for the nodes (AmazonEKSWorkerNodePolicy, AmazonEC2ContainerRegistryReadOnly, AmazonEKS_CNI_Policy)."
  type        = string
}

variable "instance_types" {
  description = "GPU instance types (g5.xlarge: one A10G; g6.xlarge: one L4; p4d.24xlarge: eight A100)."
  type        = list(string)
  default     = ["g5.xlarge"]
}

variable "capacity_type" {
  description = "ON_DEMAND or SPOT."
  type        = string
  default     = "ON_DEMAND"
}

variable "min_nodes" {
  description = "Fewest GPU nodes."
  type        = number
  default     = 1
}

variable "desired_nodes" {
  description = "GPU nodes at creation (the cluster autoscaler or Karpenter changes it afterwards)."
  type        = number
  default     = 2
}

variable "max_nodes" {
  description = "Most GPU nodes (KEDA's maxReplicas should fit)."
  type        = number
  default     = 4
}

variable "gpus_per_replica" {
  description = "nvidia.com/gpu each replica requests (the NVIDIA device plugin must run: the EKS GPU AMI has the driver)."
  type        = number
  default     = 1
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
  description = "Redis for shared keys and limits (state.backend redis), e.g. an ElastiCache endpoint."
  type        = string
  sensitive   = true
}

variable "extra_values" {
  description = "More chart values as YAML documents (merged after this module's own)."
  type        = list(string)
  default     = []
}
