"""crdgol: a Kubernetes-native AI gateway built on Envoy."""

__version__ = "0.1.0"
