"""The transport: the only package that imports grpc or the generated protobuf modules."""

from .interceptors import ServiceInterceptor
from .servicers import AdminService, AggregationService, Limits
from .streams import add_services

__all__ = ["AdminService", "AggregationService", "Limits", "ServiceInterceptor", "add_services"]
