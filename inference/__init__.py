"""SmartNodule inference package."""
