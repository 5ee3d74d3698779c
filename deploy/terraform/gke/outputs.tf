output "node_pool_name" {
  description = "The GPU node pool's name."
  value       = google_container_node_pool.gpu.name
}
