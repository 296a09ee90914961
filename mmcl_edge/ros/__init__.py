"""Robot recordings in and out, without ROS or PyTorch: ROS 2 / ROS 1 bags read and written with
``rosbags`` (the ``ros`` extra), topics aligned into multi-modal samples by ``SensorWindow``.

    from mmcl_edge.ros import SensorWindow            # in a ROS 2 node: push messages, get samples
    from mmcl_edge.ros import bag_to_task_folder      # a labelled bag -> a generic-format task folder
"""
from mmcl_edge.ros.bag import Bag, bag_sha256
from mmcl_edge.ros.convert import LabelRow, bag_origin, bag_to_task_folder, read_labels
from mmcl_edge.ros.replay import PREDICTION_TOPIC, replay
from mmcl_edge.ros.topics import TopicSource, load_topics
from mmcl_edge.ros.window import SensorWindow, Window

__all__ = ["SensorWindow", "Window", "TopicSource", "load_topics", "Bag", "bag_sha256", "bag_origin",
           "bag_to_task_folder", "read_labels", "LabelRow", "replay", "PREDICTION_TOPIC"]
