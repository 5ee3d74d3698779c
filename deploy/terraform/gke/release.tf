# The InferFlux chart on the GPU nodes through the helm provider, and what the release gives back.
provider "helm" {
  kubernetes {
    host                   = "https://${data.google_container_cluster.this.endpoint}"
    token                  = data.google_client_config.current.access_token
    cluster_ca_certificate = base64decode(data.google_container_cluster.this.master_auth[0].cluster_ca_certificate)
  }
}

resource "helm_release" "inferflux" {
  name             = "inferflux"
  chart            = var.chart_path
  namespace        = var.namespace
  create_namespace = true
  # Waits for every replica's /readyz: the first start compiles the model's programs.
  wait    = true
  timeout = 1800

  values = concat([yamlencode({
    image = { repository = "ghcr.io/inferflux/inferflux", tag = var.image_tag }
    model = { name = var.model_name, source = var.model_source, demo = false }
    config = {
      server   = { host = "0.0.0.0", port = 8080, drain_seconds = 60 }
      runtime  = { warmup = true }
      security = { auth = "required", public_metrics = true }
      state    = { backend = "redis" }
    }
    resources = {
      requests = { cpu = "6", memory = "24Gi", "nvidia.com/gpu" = tostring(var.accelerator_count) }
      limits   = { memory = "30Gi", "nvidia.com/gpu" = tostring(var.accelerator_count) }
    }
    nodeSelector = { "cloud.google.com/gke-accelerator" = var.accelerator_type }
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

  depends_on = [google_container_node_pool.gpu]
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
