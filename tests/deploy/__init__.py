"""Offline validation of docker/: the images, compose, Grafana/Prometheus and the Kubernetes manifests."""
