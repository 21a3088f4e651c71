"""SmartNodule config package."""
