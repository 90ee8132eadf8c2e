"""The rounds domain: each federation's state machine, its events, publication and views.

No grpc and no paths: the api layer calls in, the store is reached through its protocol.
"""

from .events import (
    BusClosedError,
    EventBus,
    EventType,
    Phase,
    PrivacyStatus,
    RoundEvent,
    Snapshot,
    Subscription,
    WatcherLaggedError,
)
from .hub import FederationHub
from .runtime import FederationRuntime, RuntimeLimits
from .tickets import PushOutcome, PushTicket
from .views import View

__all__ = [
    "BusClosedError",
    "EventBus",
    "EventType",
    "FederationHub",
    "FederationRuntime",
    "Phase",
    "PrivacyStatus",
    "PushOutcome",
    "PushTicket",
    "RoundEvent",
    "RuntimeLimits",
    "Snapshot",
    "Subscription",
    "View",
    "WatcherLaggedError",
]
