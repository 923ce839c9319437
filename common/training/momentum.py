"""TF1's MomentumOptimizer as a Keras 3 optimizer.

TF1: `v = momentum * v + grad; w -= lr * v`. Keras' SGD keeps the learning rate inside the
velocity (`v = momentum * v - lr * grad; w += v`), which differs right after a learning-rate
drop: the old velocity keeps the old rate's scale. The CIFAR-10 original's schedule drops the
rate twice, so the port uses TF1's rule.
"""

import keras


class TF1Momentum(keras.optimizers.Optimizer):
    """Momentum without Nesterov, the velocity accumulating raw gradients."""

    def __init__(self, learning_rate, momentum=0.9, name="TF1Momentum", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = momentum

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.velocities = [self.add_variable_from_reference(variable, "momentum")
                           for variable in variables]

    def update_step(self, gradient, variable, learning_rate):
        velocity = self.velocities[self._get_variable_index(variable)]
        self.assign(velocity, self.momentum * velocity + gradient)
        self.assign_sub(variable, learning_rate * velocity)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum}
