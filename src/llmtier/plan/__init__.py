"""The planner: memory model, device profile, placement and predicted speed -- the one place placement is decided.

``plan`` sits below the runtimes (``offload``) and imports none of them: the
weight streamer, the KV tier and the offloaded optimizer call into it.
"""
from .memory import LayerMemory, ModelConfigError, ModelMemory, TrainingMemory, load_config, model_memory
from .planner import ExpertPlacement, KVPlan, OptimPlan, Placement, Prediction, Workload, plan_given, plan_inference, plan_training
from .profile import DeviceProfile, LayerTiming, ProfileError, default_path, load_profile, save_profile

__all__ = ["DeviceProfile", "ExpertPlacement", "KVPlan", "LayerMemory", "LayerTiming", "ModelConfigError", "ModelMemory",
           "OptimPlan", "Placement",
           "Prediction", "ProfileError", "TrainingMemory", "Workload", "default_path", "load_config", "load_profile", "model_memory",
           "plan_given", "plan_inference", "plan_training", "save_profile"]
