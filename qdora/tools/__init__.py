"""Around training: the memory planner (`qdora plan`) and the weight-decomposition analysis (`qdora analyze`)."""
