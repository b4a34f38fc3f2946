//! Two-stage MM-SP balancing (placeholder).
