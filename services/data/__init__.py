"""vfm-datad: the Data Agent (knowledge collections, episodic memory, retrieval)."""
