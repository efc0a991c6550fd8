"""Building blocks shared by the towers."""
