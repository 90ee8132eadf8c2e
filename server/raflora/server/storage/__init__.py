"""Durable state: the store protocol, its filesystem and in-memory implementations.

The rounds layer talks to a :class:`FederationStore` and never sees a path.
"""

from .manifest import ManifestError, ManifestPrivacy, ManifestUpload, RoundManifest
from .memory import MemoryFederationStore, MemoryStorage
from .records import ClientRecord, UploadRecord
from .store import (
    CorruptDataError,
    FederationStore,
    FileFederationStore,
    FileStorage,
    ResumeReport,
    Storage,
    StoredView,
    UploadSink,
)

__all__ = [
    "ClientRecord",
    "CorruptDataError",
    "FederationStore",
    "FileFederationStore",
    "FileStorage",
    "ManifestError",
    "ManifestPrivacy",
    "ManifestUpload",
    "MemoryFederationStore",
    "MemoryStorage",
    "ResumeReport",
    "RoundManifest",
    "Storage",
    "StoredView",
    "UploadRecord",
    "UploadSink",
]
