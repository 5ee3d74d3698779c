# A GPU managed node group in an existing EKS cluster and the InferFlux chart on it (docs/deploy.md, "Terraform").
provider "aws" {
  region = var.region
}

data "aws_eks_cluster" "this" {
  name = var.cluster_name
}

data "aws_eks_cluster_auth" "this" {
  name = var.cluster_name
}

resource "aws_eks_node_group" "gpu" {
  cluster_name    = var.cluster_name
  node_group_name = "inferflux-gpu"
  node_role_arn   = var.node_role_arn
  subnet_ids      = var.subnet_ids
  instance_types  = var.instance_types
  capacity_type   = var.capacity_type
  # The EKS-optimized AL2023 NVIDIA AMI: driver and container toolkit installed.
  ami_type  = "AL2023_x86_64_NVIDIA"
  disk_size = 200

  scaling_config {
    min_size     = var.min_nodes
    desired_size = var.desired_nodes
    max_size     = var.max_nodes
  }

  # One node at a time, as the chart's PodDisruptionBudget lets one replica drain at once.
  update_config {
    max_unavailable = 1
  }

  labels = {
    "inferflux.dev/pool" = "gpu"
  }

  taint {
    key    = "nvidia.com/gpu"
    value  = "present"
    effect = "NO_SCHEDULE"
  }

  lifecycle {
    ignore_changes = [scaling_config[0].desired_size]
  }
}
