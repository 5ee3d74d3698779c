output "node_group_name" {
  description = "The GPU managed node group's name."
  value       = aws_eks_node_group.gpu.node_group_name
}
