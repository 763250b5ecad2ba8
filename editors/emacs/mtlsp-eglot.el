;; mtlsp with eglot (Emacs 29+, or Emacs 28 with the eglot package)
(require 'eglot)
(add-to-list 'eglot-server-programs
             '((python-mode js-mode typescript-mode go-mode rust-mode java-mode c-mode c++-mode)
               . ("mtlsp" "serve" :initializationOptions (:maxTokens 48 :device "auto"))))
(add-hook 'python-mode-hook #'eglot-ensure)
