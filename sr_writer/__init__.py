"""SmartNodule sr_writer package."""
