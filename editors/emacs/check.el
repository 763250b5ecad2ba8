;; Checks editors/emacs/mtlsp-eglot.el against the real server (`mtlsp` on PATH):
;;   emacs --batch --no-init-file --eval '(package-initialize)' \
;;     -l editors/emacs/mtlsp-eglot.el -l editors/emacs/check.el FILE.py
;; Prints the server's name and the popup candidates at the first "pricing.app" in FILE.py.
(find-file (car command-line-args-left))
(python-mode)
(apply (function eglot) (eglot--guess-contact))
(let ((deadline (+ (float-time) 60)))
  (while (and (not (eglot-current-server)) (< (float-time) deadline))
    (accept-process-output nil 0.2)))
(unless (eglot-current-server) (error "eglot did not connect"))
(princ (format "connected: %s\n" (eglot--server-info (eglot-current-server))))
(let ((deadline (+ (float-time) 60)) (ready nil))  ; the model loads and the folder is indexed
  (while (and (not ready) (< (float-time) deadline))
    (let ((folders (plist-get (jsonrpc-request (eglot-current-server) :mtlsp/status nil) :folders)))
      (setq ready (and (> (length folders) 0)
                       (equal (plist-get (plist-get (aref folders 0) :indexing) :phase) "ready"))))
    (unless ready (accept-process-output nil 0.2))))
(goto-char (point-min))
(search-forward "pricing.app")
(let* ((capf (eglot-completion-at-point))
       (cands (all-completions (buffer-substring (nth 0 capf) (nth 1 capf)) (nth 2 capf))))
  (princ (format "completions at pricing.app: %S\n" cands)))
(kill-emacs 0)
