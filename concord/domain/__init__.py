"""The business core: ordering guard, status table, flow rules and routing; pure, no broker, no clock."""
