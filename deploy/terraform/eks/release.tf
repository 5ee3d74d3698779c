# The InferFlux chart on the GPU nodes through the helm provider, and what the release gives back.
provider "helm" {
  kubernetes {
    host                   = data.aws_eks_cluster.this.endpoint
    cluster_ca_certificate = base64decode(data.aws_eks_cluster.this.certificate_authority[0].data)
    token                  = data.aws_eks_cluster_auth.this.token
  }
}

resource "helm_release" "inferflux" {
  name             = "inferflux"
  chart            = var.chart_path
  namespace        = var.namespace
  create_namespace = true
  wait             = true
  timeout          = 1800

  values = concat([yamlencode({
    image = { repository = "ghcr.io/inferflux/inferflux", tag = var.image_tag }
    model = { name = var.model_name, source = var.model_source, demo = false }
    config = {
      server   = { host = "0.0.0.0", port = 8080, drain_seconds = 60 }
      runtime  = { warmup = true }
      security = { auth = "required", public_metrics = true }
      state    = { backend = "redis" }
    }
    persistence = { enabled = true, size = "100Gi", storageClassName = "gp3" }
    resources = {
      requests = { cpu = "3", memory = "12Gi", "nvidia.com/gpu" = tostring(var.gpus_per_replica) }
      limits   = { memory = "14Gi", "nvidia.com/gpu" = tostring(var.gpus_per_replica) }
    }
    nodeSelector = { "inferflux.dev/pool" = "gpu" }
    tolerations  = [{ key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }]
  })], var.extra_values)

  set_sensitive {
    name  = "secrets.masterKey"
    value = var.master_key
  }
  set_sensitive {
    name  = "secrets.redisUrl"
    value = var.redis_url
  }

  depends_on = [aws_eks_node_group.gpu]
}

output "release_name" {
  description = "The Helm release."
  value       = helm_release.inferflux.name
}

output "namespace" {
  description = "Namespace the release runs in."
  value       = helm_release.inferflux.namespace
}

output "service_url" {
  description = "In-cluster URL of the InferFlux Service (OpenAI, Ollama, LM Studio, Anthropic APIs)."
  value       = "http://${helm_release.inferflux.name}.${helm_release.inferflux.namespace}.svc:8080"
}
