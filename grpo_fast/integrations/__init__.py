"""Integrations of the fused loss with other trainers."""
