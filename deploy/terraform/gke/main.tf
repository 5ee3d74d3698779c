# A GPU node pool in an existing GKE cluster and the InferFlux chart on it (docs/deploy.md, "Terraform").
provider "google" {
  project = var.project_id
}

data "google_client_config" "current" {}

data "google_container_cluster" "this" {
  name     = var.cluster_name
  location = var.location
}

resource "google_container_node_pool" "gpu" {
  name           = "inferflux-gpu"
  cluster        = data.google_container_cluster.this.id
  location       = var.location
  node_locations = length(var.node_locations) > 0 ? var.node_locations : null

  autoscaling {
    min_node_count = var.min_nodes
    max_node_count = var.max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  # Surge one node at a time: the chart's PodDisruptionBudget lets one replica drain at once.
  upgrade_settings {
    max_surge       = 1
    max_unavailable = 0
  }

  node_config {
    machine_type = var.machine_type
    spot         = var.spot
    disk_size_gb = 200
    guest_accelerator {
      type  = var.accelerator_type
      count = var.accelerator_count
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST"
      }
    }
    labels = {
      "inferflux.dev/pool" = "gpu"
    }
    # GKE taints GPU nodes nvidia.com/gpu=present:NoSchedule itself; the chart tolerates it.
    oauth_scopes = ["https://www.googleapis.com/auth/cloud-platform"]
  }
}
