"""The quick start's scorers of what a caption or an answer gets right, on hand-made scenes."""
import world


def obj(color, shape, size, row):
    return dict(color=color, shape=shape, size=size, row=row, x=0.5)


SCENE1 = [obj("red", "circle", "big", 0)]
SCENE3 = [obj("red", "circle", "big", 0), obj("blue", "square", "small", 1), obj("green", "circle", "small", 2)]


def test_caption_attribute_hits_object_by_object():
    truth = world.scene_caption(SCENE3)
    assert world.caption_attribute_hits(truth, SCENE3) == dict(color=3, shape=3, size=3, objects=3, count=1)
    # the second and third objects' colours swapped, the third object missing its size and then left out
    said = "a picture of a big red circle above a small green square above a blue circle"
    assert world.caption_attribute_hits(said, SCENE3) == dict(color=1, shape=3, size=2, objects=3, count=1)
    assert world.caption_attribute_hits("a big red circle", SCENE3) == dict(color=1, shape=1, size=1, objects=3,
                                                                           count=0)
    acc = world.caption_attribute_accuracy({"a": said, "b": "there is a small red square"}, {"a": SCENE3, "b": SCENE1})
    assert acc == dict(color=50.0, shape=75.0, size=50.0, count=100.0)


def test_accuracy_by_objects_splits_one_type_by_scene_size():
    scenes = {"one.png": SCENE1, "three.png": SCENE3}
    questions = [dict(question_id=0, image="one.png", answers=["red"], answer_type="color"),
                 dict(question_id=1, image="three.png", answers=["blue"], answer_type="color"),
                 dict(question_id=2, image="three.png", answers=["red"], answer_type="color"),
                 dict(question_id=3, image="three.png", answers=["big"], answer_type="size")]
    answers = {0: "Red", 1: "blue", 2: "green", 3: "small"}  # normalised as the VQA scorer does
    assert world.accuracy_by_objects(answers, questions, scenes, "color") == {"1": 100.0, "3": 50.0}
    assert world.accuracy_by_objects(answers, questions, scenes, "size") == {"3": 0.0}
