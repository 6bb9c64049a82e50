"""The run's settings: preset.txt and input_data/condition.txt read, typed and checked in one place."""
from modules.config.files import CONDITION_FILE, PRESET_FILE, check_flag, load_config
from modules.config.keys import FLAG_KEYS, KEYS
from modules.config.settings import Config

__all__ = ["CONDITION_FILE", "PRESET_FILE", "check_flag", "load_config", "KEYS", "FLAG_KEYS", "Config"]
